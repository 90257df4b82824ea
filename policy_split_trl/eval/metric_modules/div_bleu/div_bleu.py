"""Div-BLEU (Eq. 12 of Policy Split, arXiv 2604.11510) as an offline `evaluate` metric."""

from __future__ import annotations

import datasets
import evaluate

from policy_split_trl.eval.creative import div_bleu as _div_bleu
from policy_split_trl.eval.creative import mean_over_prompts

_CITATION = """\
@misc{policysplit2026,
  title         = {Policy Split: Incentivizing Dual-Mode Exploration in LLM Reinforcement with Dual-Mode Entropy
                   Regularization},
  eprint        = {2604.11510},
  archivePrefix = {arXiv},
  year          = {2026}
}
@inproceedings{zhu2018texygen,
  title     = {Texygen: A Benchmarking Platform for Text Generation Models},
  author    = {Zhu, Yaoming and Lu, Sidi and Zheng, Lei and Guo, Jiaxian and Zhang, Weinan and Wang, Jun and
               Yu, Yong},
  booktitle = {SIGIR},
  year      = {2018}
}
@inproceedings{post-2018-call,
  title     = {A Call for Clarity in Reporting {BLEU} Scores},
  author    = {Post, Matt},
  booktitle = {Proceedings of the Third Conference on Machine Translation: Research Papers},
  year      = {2018}
}
"""

_DESCRIPTION = """\
Self-BLEU diversity of the k >= 2 stories sampled for one prompt (Eq. 12 of Policy Split):
`1 - mean_i BLEU-4(o_i, references = the other k - 1 stories)`, BLEU-4 being `sacrebleu.sentence_bleu` with its
defaults (13a tokenizer, case-sensitive, exp smoothing, effective order) / 100. The value is in [0, 1]: 0 when all
stories are identical, 1 when no two share a word; the paper reports it x100. Same computation as
`policy_split_trl.eval.creative.div_bleu`.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]` or `list[list[str]]`):
        Either the k >= 2 stories of ONE prompt (a flat list of strings), or several groups, one list of k stories
        per prompt; then the result is the mean of the per-group values (one number per model, as in Table 2).

Returns:
    `dict`: `{"div_bleu": float}`.

Examples:
    >>> div_bleu = evaluate.load(metric_path("div_bleu"))
    >>> div_bleu.compute(predictions=["the same story", "the same story"])
    {'div_bleu': 0.0}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class DivBLEU(evaluate.Metric):
    """Div-BLEU (Eq. 12): one minus the mean self-BLEU-4 of the stories of one prompt."""

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
            reference_urls=["https://arxiv.org/abs/2604.11510", "https://github.com/mjpost/sacrebleu"],
        )

    def _compute(self, predictions: list[str] | list[list[str]]) -> dict[str, float]:
        return {"div_bleu": mean_over_prompts(_div_bleu, predictions)}
