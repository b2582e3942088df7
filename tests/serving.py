"""What the server tests share: the tiny models' edit settings and a chat template."""
from __future__ import annotations

from neuraldb.serve.process import ServerProcess as Server  # noqa: F401 - re-exported for the tests

# the tiny models' edit settings (tests/test_engine.py's CFG): strong enough to change an answer
TINY_CONFIG = ("layer: 1\ngamma: 0.65\nn_prefixes: 2\nprefix_len: 4\nresidual_prefixes: 1\nsteps: 40\nlr: 0.5\n"
               "weight_decay: 0.0\nclamp_norm: 4.0\n")
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")
