"""The stock WSC273 document processing, from lm-evaluation-harness itself (not re-implemented)."""
from lm_eval.tasks.wsc273.utils import process_doc  # noqa: F401
