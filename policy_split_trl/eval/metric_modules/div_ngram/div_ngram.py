"""Div-N-Gram (Eq. 11 of Policy Split, arXiv 2604.11510) as an offline `evaluate` metric."""

from __future__ import annotations

import datasets
import evaluate

from policy_split_trl.eval.creative import div_ngram as _div_ngram
from policy_split_trl.eval.creative import mean_over_prompts

_CITATION = """\
@misc{policysplit2026,
  title         = {Policy Split: Incentivizing Dual-Mode Exploration in LLM Reinforcement with Dual-Mode Entropy
                   Regularization},
  eprint        = {2604.11510},
  archivePrefix = {arXiv},
  year          = {2026}
}
@inproceedings{li2016diversity,
  title     = {A Diversity-Promoting Objective Function for Neural Conversation Models},
  author    = {Li, Jiwei and Galley, Michel and Brockett, Chris and Gao, Jianfeng and Dolan, Bill},
  booktitle = {NAACL-HLT},
  year      = {2016}
}
"""

_DESCRIPTION = """\
N-gram diversity of the k stories sampled for one prompt (Eq. 11 of Policy Split): the mean over the stories of
`#unique n-grams / #n-grams` of each story (distinct-n, Li et al. 2016), with n = 2 in the paper. Stories are
lowercased and split on whitespace; a story with fewer than n tokens scores 0. The value is in [0, 1]; the paper
reports it x100. Same computation as `policy_split_trl.eval.creative.div_ngram`.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]` or `list[list[str]]`):
        Either the k stories of ONE prompt (a flat list of strings), or several groups, one list of k stories per
        prompt; then the result is the mean of the per-group values (one number per model, as in Table 2).
    n (`int`, *optional*, defaults to `2`):
        N-gram order.

Returns:
    `dict`: `{"div_ngram": float}`.

Examples:
    >>> div_ngram = evaluate.load(metric_path("div_ngram"))
    >>> div_ngram.compute(predictions=["a b a b", "a b c d"])  # (2/3 + 3/3) / 2
    {'div_ngram': 0.8333333333333333}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class DivNGram(evaluate.Metric):
    """Div-N-Gram (Eq. 11): mean distinct n-gram ratio of the stories of one prompt."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            # The grouped format first: a flat list of strings does not match it, so `evaluate` falls back to the
            # one-group format.
            features=[
                datasets.Features({"predictions": datasets.Sequence(datasets.Value("string"))}),
                datasets.Features({"predictions": datasets.Value("string")}),
            ],
            reference_urls=["https://arxiv.org/abs/2604.11510"],
        )

    def _compute(self, predictions: list[str] | list[list[str]], n: int = 2) -> dict[str, float]:
        return {"div_ngram": mean_over_prompts(_div_ngram, predictions, n=n)}
