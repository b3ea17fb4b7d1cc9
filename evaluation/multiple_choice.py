"""Log-likelihood multiple-choice scoring of the MC benchmarks: lm-eval tasks and a fast in-memory scorer.

Each multiple-choice item (scorer ``mc``; the paper-data user message is ``<question>\\n\\nChoices:\\nA. ...\\n
B. ...\\n\\nPlease answer with the single correct option letter (e.g., A).``) becomes a *cloze* doc:

* ``stem``: the question text, i.e. the user message without its ``Choices:`` block and the closing
  "Please answer ..." instruction (format-based: the options are read by
  :func:`rpsft.evaluation.answers.parse_choices`, so letters ``A.``, numbers ``1.``, multi-line options work);
* ``options``: the option texts in label order, ``gold``: the index of the gold label;
* context ``"Question: {stem}\\nAnswer:"`` and one continuation ``" " + option`` per option.

No chat template and no system message: plain-text cloze scoring is what moves on small models (a chat
prompt that asks for a *letter* makes every option text improbable). The score of an option is the sum of
its continuation tokens' log-probabilities (``ll``); ``acc`` takes the argmax of ``ll``, ``acc_norm`` the
argmax of ``ll / len(option text)`` (characters, as lm-eval's ``acc_norm``), ``gold_prob`` is the softmax
over options of ``ll`` at the gold option (a continuous score).

Two ways to run it, same numbers:

* lm-eval tasks ``rpsft_mc_<name>`` (tag ``rpsft_mc``, ``output_type: multiple_choice``), written by
  :func:`write_mc_task_dir`; run with ``lm_eval --include_path DIR --tasks rpsft_mc`` or
  ``simple_evaluate(..., task_manager=TaskManager(include_path=DIR))``;
* :func:`mc_item_scores` / :func:`mc_scores_by_benchmark`: forward passes on an in-memory model, tokenized
  exactly as lm-eval's ``HFLM.loglikelihood`` does (trailing context whitespace moved to the continuation,
  continuation tokens = ``encode(context + continuation)[len(encode(context)):]``, the tokenizer's own
  special-token default unless the text already starts with the BOS/EOS string, left truncation to
  ``max_length + 1`` tokens). Log-softmax is taken in float32 (lm-eval uses the model dtype: for a
  bf16/fp16 model the two differ by rounding).
"""

from __future__ import annotations

import json
import math
import string
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator
from rpsft.evaluation.answers import _CHOICE_LINE, parse_choices
from rpsft.evaluation.benchmarks import Benchmark, EvalConfigError, build_registry
from rpsft.evaluation.items import EvalDataError, Item, load_items, resolve_file
from rpsft.evaluation.lm_eval_tasks import FunctionRef, _Dumper

__all__ = [
    "MC_TASK_PREFIX",
    "MC_TAG",
    "DEFAULT_MC_TEMPLATE",
    "DEFAULT_MC_BENCHMARKS",
    "MCDoc",
    "MCScore",
    "MCSettings",
    "split_mc_prompt",
    "mc_doc",
    "mc_docs",
    "load_mc_docs",
    "mc_task_config",
    "mc_task_yaml",
    "write_mc_task_dir",
    "encode_pair",
    "pair_loglikelihoods",
    "score_from_lls",
    "mc_item_scores",
    "mc_scores_by_benchmark",
    "mc_benchmark_docs",
]

MC_TASK_PREFIX = "rpsft_mc_"
MC_TAG = "rpsft_mc"
DEFAULT_MC_TEMPLATE = "Question: {stem}\nAnswer:"
TARGET_DELIMITER = " "
DEFAULT_MC_BENCHMARKS = ("gpqa", "mmlu_pro", "safety", "truthfulqa_mc")
_INSTRUCTION_START = "please answer with"


# ---------------------------------------------------------------------------------------------- docs


def _is_header(line: str) -> bool:
    return line.strip().lower().rstrip(":") in ("choices", "options")


def _headerless_list_start(lines: list[str]) -> int | None:
    """Line index where :func:`parse_choices` starts the option list it returns (no ``Choices:`` header)."""
    found: list[str] = []
    start: int | None = None
    for i, line in enumerate(lines):
        if line.strip().lower().startswith(_INSTRUCTION_START):
            break
        match = _CHOICE_LINE.match(line)
        if not match:
            continue
        label = match.group(1)
        numeric = bool(found) and found[0].isdigit()
        expected = str(len(found) + 1) if numeric else chr(ord("A") + len(found))
        if found and label == expected:
            found.append(label)
            continue
        first = "1" if numeric else "A"
        if label in ("A", "1") and (not found or label == first):
            found, start = [label], i
    return start


def split_mc_prompt(user: str) -> tuple[str, dict[str, str]]:
    """``(stem, {label: option text})`` of an MC user message; the stem is ``""`` when there is none.

    The stem is the text before the (last) ``Choices:``/``Options:`` header, or, without a header, before the
    first option line of the list :func:`parse_choices` reads; lines of the "Please answer with ..."
    instruction are dropped from it.
    """
    choices = parse_choices(user)
    lines = user.splitlines()
    headers = [i for i, line in enumerate(lines) if _is_header(line)]
    if headers:
        end = headers[-1]
    else:
        start = _headerless_list_start(lines) if choices else None
        end = start if start is not None else len(lines)
    kept = [line for line in lines[:end] if not line.strip().lower().startswith(_INSTRUCTION_START)]
    return "\n".join(kept).strip(), choices


def _check_template(template: str) -> str:
    fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    if fields != ["stem"]:
        raise EvalConfigError(
            f"template: {template!r} must contain the field {{stem}} exactly once and no other field. "
            f"Fix: e.g. {DEFAULT_MC_TEMPLATE!r}"
        )
    return template


@dataclass
class MCDoc:
    """One cloze multiple-choice doc (flat: what the lm-eval task reads)."""

    benchmark: str
    index: int
    stem: str
    labels: list[str]
    options: list[str]
    gold: int
    context: str

    @property
    def target(self) -> str:
        return self.labels[self.gold]

    def requests(self) -> list[tuple[str, str]]:
        """The ``(context, continuation)`` pairs, one per option (as lm-eval builds them)."""
        return [(self.context, TARGET_DELIMITER + option) for option in self.options]

    def doc(self) -> dict[str, Any]:
        return asdict(self)


def _where(bench: Benchmark, data_dir: str | Path | None, subset: str, index: int) -> str:
    """``"<name>: <file>:<line>"`` of the ``index``-th row (only computed for error messages)."""
    try:
        path = resolve_file(bench, data_dir, subset)
    except EvalDataError:
        path = None
    if path is None:
        source = bench.hub.path if bench.hub else "?"
        return f"{bench.name}: hub {source} row {index}"
    from rpsft.core.data import iter_jsonl

    for i, (where, _) in enumerate(iter_jsonl(path, error=EvalDataError, label=bench.name)):
        if i == index:
            return where
    return f"{bench.name}: {path} row {index}"


def mc_doc(item: Item, template: str = DEFAULT_MC_TEMPLATE, *, where: str | None = None) -> MCDoc:
    """The cloze doc of one validated ``mc`` item; ``where`` names the file and line in errors."""
    where = where or f"{item.benchmark}: item {item.index}"
    if item.scorer != "mc":
        raise EvalConfigError(
            f"{where}: benchmark {item.benchmark!r} has scorer {item.scorer!r}; log-likelihood multiple "
            "choice needs scorer 'mc'. Fix: select multiple-choice benchmarks only"
        )
    stem, choices = split_mc_prompt(item.user)
    if not choices:
        raise EvalDataError(
            f"{where}: prompt (user message): no options found. Fix: list the options one per line as "
            "'A. ...', 'B. ...' after a 'Choices:' line"
        )
    if not stem:
        raise EvalDataError(
            f"{where}: prompt (user message): no question text before the options. Fix: put the question "
            "first, then a blank line, 'Choices:' and the options"
        )
    empty = [label for label, text in choices.items() if not text.strip()]
    if empty:
        raise EvalDataError(
            f"{where}: prompt (user message): option {', '.join(empty)} has no text (a cloze option is scored "
            "by its text). Fix: write the option as 'A. <text>' on one line"
        )
    labels = list(choices)
    gold = item.target.strip().upper()
    if gold not in labels:
        raise EvalDataError(
            f"{where}: reward_model.ground_truth {item.target!r} is not one of the option labels "
            f"{''.join(labels)}. Fix: give the correct option's label"
        )
    return MCDoc(
        benchmark=item.benchmark,
        index=item.index,
        stem=stem,
        labels=labels,
        options=[choices[label] for label in labels],
        gold=labels.index(gold),
        context=template.format(stem=stem),
    )


def mc_docs(
    bench: Benchmark,
    data_dir: str | Path | None = None,
    subset: str = "full",
    limit: int | None = None,
    template: str = DEFAULT_MC_TEMPLATE,
) -> list[MCDoc]:
    """The validated cloze docs of an ``mc`` benchmark (the first ``limit``); errors name file and line."""
    if bench.scorer != "mc":
        raise EvalConfigError(
            f"benchmarks: {bench.name} has scorer {bench.scorer!r}; log-likelihood multiple choice needs scorer "
            "'mc'. Fix: leave it out, or declare the benchmark with 'scorer: mc'"
        )
    _check_template(template)
    docs = []
    for item in load_items(bench, data_dir, subset, limit):
        try:
            docs.append(mc_doc(item, template))
        except EvalDataError:  # again, with the file and line in the message
            docs.append(mc_doc(item, template, where=_where(bench, data_dir, subset, item.index)))
    return docs


def load_mc_docs(
    benchmark: dict[str, Any] | None = None,
    data_dir: str | None = None,
    subset: str = "full",
    limit: int | None = None,
    template: str = DEFAULT_MC_TEMPLATE,
    **_ignored: Any,
):
    """``custom_dataset`` of the ``rpsft_mc_*`` tasks: the cloze docs of one benchmark as a ``DatasetDict``."""
    import datasets

    if benchmark is None:
        raise ValueError("load_mc_docs: dataset_kwargs.benchmark is missing. Fix: regenerate the task YAML")
    bench = Benchmark.model_validate(benchmark)
    docs = [d.doc() for d in mc_docs(bench, data_dir, subset, limit, template)]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


# ------------------------------------------------------------------------------------------- lm-eval


def _resolve(benchmarks: Sequence[Benchmark | str]) -> list[Benchmark]:
    registry = build_registry([b for b in benchmarks if isinstance(b, Benchmark)])
    out = []
    for b in benchmarks:
        if isinstance(b, Benchmark):
            out.append(b)
            continue
        key = b.removeprefix(MC_TASK_PREFIX).removeprefix("rpsft_")
        if key not in registry:
            mc = sorted(n for n, x in registry.items() if x.scorer == "mc")
            raise EvalConfigError(f"benchmarks: unknown benchmark {b!r}. Fix: one of {', '.join(mc)}")
        out.append(registry[key])
    return out


def mc_task_name(bench: Benchmark) -> str:
    return MC_TASK_PREFIX + bench.name


def mc_task_config(
    bench: Benchmark,
    data_dir: str | Path | None,
    subset: str = "full",
    limit: int | None = None,
    *,
    template: str = DEFAULT_MC_TEMPLATE,
) -> dict[str, Any]:
    """The lm-eval ``multiple_choice`` task config (YAML-ready) of one ``mc`` benchmark.

    Every row is read and checked here (fails before a model is loaded). ``limit``: the task's dataset holds
    only the first ``limit`` items.
    """
    mc_docs(bench, data_dir, subset, limit, template)  # validate now
    return {
        "task": mc_task_name(bench),
        "tag": [MC_TAG],
        "custom_dataset": FunctionRef("rpsft.evaluation.multiple_choice.load_mc_docs"),
        "dataset_kwargs": {
            "benchmark": json.loads(bench.model_dump_json()),
            "data_dir": str(Path(data_dir).expanduser().resolve()) if data_dir is not None else None,
            "subset": subset,
            "limit": limit,
            "template": template,
        },
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "context",
        "doc_to_choice": "options",
        "doc_to_target": "gold",
        "target_delimiter": TARGET_DELIMITER,
        "num_fewshot": 0,
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1, "rpsft_suite": bench.suite, "rpsft_scorer": "mc_loglikelihood"},
    }


def mc_task_yaml(bench: Benchmark, data_dir: str | Path | None, subset: str = "full", **kwargs: Any) -> str:
    config = mc_task_config(bench, data_dir, subset, **kwargs)
    return yaml.dump(config, Dumper=_Dumper, sort_keys=False, allow_unicode=True)


def write_mc_task_dir(
    benchmarks: Sequence[Benchmark | str],
    data_dir: str | Path | None,
    subset: str = "full",
    directory: str | Path = "rpsft-mc-tasks",
    *,
    limit: int | None = None,
    template: str = DEFAULT_MC_TEMPLATE,
) -> Path:
    """Write ``rpsft_mc_<name>.yaml`` per benchmark (names or ``Benchmark``s) into ``directory``.

    Older ``rpsft_mc_*.yaml`` there are replaced. Keep the directory apart from :func:`write_task_dir`'s,
    which removes every ``rpsft_*.yaml`` of its directory.
    """
    benches = _resolve(benchmarks)
    if not benches:
        raise EvalConfigError("benchmarks: none given. Fix: name at least one multiple-choice benchmark")
    texts = {
        mc_task_name(b): mc_task_yaml(b, data_dir, subset, limit=limit, template=template) for b in benches
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob(f"{MC_TASK_PREFIX}*.yaml"):
        old.unlink()
    for name, text in texts.items():
        (directory / f"{name}.yaml").write_text(text)
    return directory


# ------------------------------------------------------------------------------------ in-memory scorer


@dataclass
class MCScore:
    """Log-likelihood scores of one item: ``ll[i]`` = sum of the continuation log-probs of option ``i``."""

    benchmark: str
    index: int
    gold: int
    ll: list[float] = field(default_factory=list)
    acc: float = 0.0
    acc_norm: float = 0.0
    gold_prob: float = 0.0
    pred: int = -1
    pred_norm: int = -1


def _prefix_string(tokenizer: Any) -> str | None:
    prefix_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return None if prefix_id is None else tokenizer.decode(prefix_id)


def _tok_encode(tokenizer: Any, text: str, prefix: str | None) -> list[int]:
    # HFLM.tok_encode: the tokenizer's default special tokens, none when the text starts with the prefix string
    if prefix is not None and text.startswith(prefix):
        return list(tokenizer.encode(text, add_special_tokens=False))
    return list(tokenizer.encode(text))


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """``(context tokens, continuation tokens)`` exactly as lm-eval's ``HFLM.loglikelihood`` builds them."""
    prefix = _prefix_string(tokenizer)
    if context == "":
        cont = list(tokenizer.encode(continuation, add_special_tokens=False))
        prefix_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return ([prefix_id], cont) if not cont or prefix_id != cont[0] else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = _tok_encode(tokenizer, context + continuation, prefix)
    context_enc = _tok_encode(tokenizer, context, prefix)
    return context_enc, whole[len(context_enc) :]


def _model_device(model: Any):
    import torch

    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def pair_loglikelihoods(
    model: Any,
    tokenizer: Any,
    requests: Sequence[tuple[str, str]],
    *,
    batch_size: int = 8,
    max_length: int = 1024,
) -> list[float]:
    """Sum of continuation token log-probs per ``(context, continuation)`` pair (lm-eval's loglikelihood).

    Pairs are sorted by length and scored ``batch_size`` per forward pass (right padding); the model runs in
    eval mode without gradients and gets its train/eval mode back afterwards.
    """
    import torch
    from rpsft.core.data import collate_features

    if batch_size < 1 or max_length < 1:
        raise ValueError("batch_size and max_length must be >= 1")
    encoded = []
    for k, (context, continuation) in enumerate(requests):
        ctx, cont = encode_pair(tokenizer, context, continuation)
        if not ctx or not cont:
            raise ValueError(
                f"request {k}: the {'context' if not ctx else 'continuation'} encodes to no tokens "
                f"({context[-40:]!r} + {continuation[:40]!r}). Fix: non-empty context and continuation text"
            )
        if len(cont) > max_length:
            raise ValueError(
                f"request {k}: continuation of {len(cont)} tokens exceeds max_length={max_length}. "
                "Fix: raise max_length"
            )
        full = (ctx + cont)[-(max_length + 1) :]
        encoded.append((full[:-1], full[-len(cont) :]))
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    out = [0.0] * len(encoded)
    device = _model_device(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    training = getattr(model, "training", None)
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                batch = collate_features(
                    [{"input_ids": encoded[i][0], "attention_mask": [1] * len(encoded[i][0])} for i in chunk],
                    pad_id,
                )
                logits = model(**{key: value.to(device) for key, value in batch.items()}).logits
                for row, i in enumerate(chunk):
                    inp, cont = encoded[i]
                    scored = logits[row, len(inp) - len(cont) : len(inp)].float().log_softmax(dim=-1)
                    targets = torch.tensor(cont, dtype=torch.long, device=scored.device)
                    out[i] = float(scored.gather(-1, targets.unsqueeze(-1)).sum())
    finally:
        if training is not None:
            model.train(training)
    return out


def _argmax(values: Sequence[float]) -> int:
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def score_from_lls(doc: MCDoc, ll: Sequence[float]) -> MCScore:
    """acc / acc_norm / gold_prob of one doc from its per-option log-likelihoods."""
    ll = [float(x) for x in ll]
    pred = _argmax(ll)
    pred_norm = _argmax([x / float(len(option)) for x, option in zip(ll, doc.options)])
    top = max(ll)
    weights = [math.exp(x - top) for x in ll]
    return MCScore(
        benchmark=doc.benchmark,
        index=doc.index,
        gold=doc.gold,
        ll=ll,
        acc=float(pred == doc.gold),
        acc_norm=float(pred_norm == doc.gold),
        gold_prob=weights[doc.gold] / sum(weights),
        pred=pred,
        pred_norm=pred_norm,
    )


def mc_item_scores(
    model: Any, tokenizer: Any, docs: Sequence[MCDoc], *, batch_size: int = 8, max_length: int = 1024
) -> list[MCScore]:
    """Per-item log-likelihood scores of cloze docs (same numbers as the ``rpsft_mc_*`` lm-eval tasks)."""
    requests = [pair for doc in docs for pair in doc.requests()]
    lls = pair_loglikelihoods(model, tokenizer, requests, batch_size=batch_size, max_length=max_length)
    scores, pos = [], 0
    for doc in docs:
        n = len(doc.options)
        scores.append(score_from_lls(doc, lls[pos : pos + n]))
        pos += n
    return scores


class MCSettings(BaseModel):
    """Which MC items :func:`mc_scores_by_benchmark` scores: the first ``n`` of each benchmark."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, arbitrary_types_allowed=True)

    data_dir: str | None = None
    subset: str = "full"
    benchmarks: list[str | Benchmark] = Field(default_factory=lambda: list(DEFAULT_MC_BENCHMARKS))
    n: int = Field(16, ge=1, description="items per benchmark, from the start of each file")
    batch_size: int = Field(8, ge=1, description="(context, continuation) pairs per forward pass")
    max_length: int = Field(1024, ge=1)
    template: str = DEFAULT_MC_TEMPLATE
    score: Literal["acc_norm", "acc", "gold_prob"] = Field(
        "acc_norm",
        description="the per-item score a trade-off uses: accuracy (length-normalized or not), or the "
        "probability of the gold option among the options",
    )

    @field_validator("benchmarks", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value


def mc_benchmark_docs(settings: MCSettings) -> dict[str, list[MCDoc]]:
    """The validated docs :func:`mc_scores_by_benchmark` scores (no model needed; errors name file and line)."""
    return {
        b.name: mc_docs(b, settings.data_dir, settings.subset, settings.n, settings.template)
        for b in _resolve(settings.benchmarks)
    }


def mc_scores_by_benchmark(
    model: Any, tokenizer: Any, settings: MCSettings | dict[str, Any] | None = None, **overrides: Any
) -> dict[str, list[MCScore]]:
    """``{benchmark: [MCScore per item]}`` for the first ``settings.n`` items of each benchmark.

    ``settings``: :class:`MCSettings`, a dict of its fields, or ``None`` (defaults); keyword ``overrides`` win.
    All items are read and checked before the first forward pass.
    """
    if isinstance(settings, MCSettings):
        data = settings.model_dump()
        data["benchmarks"] = settings.benchmarks
    else:
        data = dict(settings or {})
    data.update({k: v for k, v in overrides.items() if v is not None})
    s = MCSettings.model_validate(data)
    docs = mc_benchmark_docs(s)
    return {
        name: mc_item_scores(model, tokenizer, d, batch_size=s.batch_size, max_length=s.max_length)
        for name, d in docs.items()
    }
