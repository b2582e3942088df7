"""Evaluation: CounterFact / zsRE metrics, fluency, retention, and the synthetic fact generator."""
from .metrics import (Retention, Scores, counterfact_scores, fluency, ngram_entropy, perplexity, retention,
                      teacher_forced, zsre_scores)

__all__ = ["Retention", "Scores", "counterfact_scores", "fluency", "ngram_entropy", "perplexity", "retention",
           "teacher_forced", "zsre_scores"]
