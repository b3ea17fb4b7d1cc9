"""The registry of benchmarks: typed configs for the paper's ID math and OOD benchmarks, plus config-only extras.

A benchmark is data, not code: a name, a suite (``id`` or ``ood``), a scorer (``math``: ``\\boxed{}`` answer
checked by math-verify; ``mc``: option letter; ``ifeval``: lm-eval's loose IFEval checkers), the JSONL file
under a data dir (the format of ``shared/paper-data``), an optional smaller ``_test`` file, the hub source for
users without the files, and the paper's number of samples ``k``. A new benchmark in the paper-data JSONL
format needs only an entry (see :func:`load_benchmark_entries`), no code.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from rpsft.core.errors import InputError

Suite = Literal["id", "ood"]
Scorer = Literal["math", "mc", "ifeval"]
SUITES: tuple[str, ...] = ("id", "ood")
TASK_PREFIX = "rpsft_"

# Same wording as the system message of the paper data.
MATH_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
MC_INSTRUCTION = "Please answer with the single correct option letter (e.g., A)."


class EvalConfigError(InputError, ValueError):
    """An evaluation request that cannot run; the message names the field (or file and line) and the fix."""


class HubSource(BaseModel):
    """Where a benchmark lives on the Hugging Face hub, and which fields hold what (dotted paths allowed).

    ``answer_format``: ``text`` (a math answer), ``letter`` (an option letter), ``index`` (0-based option index),
    ``onehot`` (a 0/1 label per option), ``first`` (the first of ``choices`` is the correct one; use with
    ``shuffle_choices``).
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    path: str
    name: str | None = None
    split: str = "test"
    question: str = "question"
    answer: str | None = "answer"
    answer_format: Literal["text", "letter", "index", "onehot", "first"] = "text"
    choices: str | list[str] | None = None
    shuffle_choices: bool = False
    solution: str | None = None
    unit: str | None = None
    instruction_ids: str | None = None
    instruction_kwargs: str | None = None
    system_prompt: str = MATH_SYSTEM_PROMPT


class Benchmark(BaseModel):
    """One benchmark. ``file``/``test_file`` are relative to the data dir (or absolute)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str
    title: str = ""
    suite: Suite
    scorer: Scorer
    file: str | None = None
    test_file: str | None = None
    hub: HubSource | None = None
    k: int = Field(4, ge=1, description="samples per item in the paper (Avg@k, Pass@k)")
    default: bool = Field(True, description="part of its suite when the suite is named")
    has_solutions: bool = Field(False, description="rows carry a reference `solution` (loss-based ID gain)")

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not re.fullmatch(r"[a-z0-9][a-z0-9_]*", value):
            raise ValueError(
                f"benchmark name {value!r} must be lowercase letters, digits and '_'. Fix: e.g. 'my_math'"
            )
        return value

    @property
    def task_name(self) -> str:
        """The lm-eval task name."""
        return TASK_PREFIX + self.name

    @property
    def display(self) -> str:
        return self.title or self.name

    def source_file(self, subset: str = "full") -> str | None:
        """The file to read for ``subset`` (``test`` falls back to the full file where no test file exists)."""
        if subset == "test" and self.test_file:
            return self.test_file
        return self.file


def _hub(path: str, **kwargs: Any) -> HubSource:
    return HubSource(path=path, **kwargs)


_MC_HUB = dict(answer_format="letter")

BUILTIN_BENCHMARKS: tuple[Benchmark, ...] = (
    # ---- in-domain math (paper Sec. 5: AIME/AMC k=16, MATH-500 and OlympiadBench 4, Minerva 8)
    Benchmark(
        name="aime24",
        title="AIME24",
        suite="id",
        scorer="math",
        file="id/aime-24.jsonl",
        k=16,
        hub=_hub("HuggingFaceH4/aime_2024", split="train", question="problem", solution="solution"),
    ),
    Benchmark(
        name="aime25",
        title="AIME25",
        suite="id",
        scorer="math",
        file="id/aime-25.jsonl",
        k=16,
        hub=_hub("math-ai/aime25", split="test", question="problem"),
    ),
    Benchmark(
        name="amc23",
        title="AMC23",
        suite="id",
        scorer="math",
        file="id/amc.jsonl",
        k=16,
        hub=_hub("math-ai/amc23", split="test", question="question"),
    ),
    Benchmark(
        name="math500",
        title="MATH-500",
        suite="id",
        scorer="math",
        file="id/math500.jsonl",
        k=4,
        has_solutions=True,
        hub=_hub("HuggingFaceH4/MATH-500", split="test", question="problem", solution="solution"),
    ),
    Benchmark(
        name="minerva",
        title="Minerva",
        suite="id",
        scorer="math",
        file="id/minerva.jsonl",
        k=8,
        has_solutions=True,
        hub=_hub("math-ai/minervamath", split="test", question="question"),
    ),
    Benchmark(
        name="olympiadbench",
        title="OlympiadBench",
        suite="id",
        scorer="math",
        file="id/olympiadBench.jsonl",
        k=4,
        has_solutions=True,
        hub=_hub(
            "Hothan/OlympiadBench",
            name="OE_TO_maths_en_COMP",
            split="train",
            question="question",
            answer="final_answer",
            solution="solution",
            unit="unit",
        ),
    ),
    # ---- out-of-domain (k = 4)
    Benchmark(
        name="gpqa",
        title="GPQA",
        suite="ood",
        scorer="mc",
        file="ood/gpqa.jsonl",
        test_file="ood/gpqa_test.jsonl",
        hub=_hub(
            "Idavidrein/gpqa",
            name="gpqa_main",
            split="train",
            question="Question",
            choices=["Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3"],
            answer=None,
            answer_format="first",
            shuffle_choices=True,
        ),
    ),
    Benchmark(
        name="ifeval",
        title="IFEval-loose",
        suite="ood",
        scorer="ifeval",
        file="ood/ifeval_loose.jsonl",
        test_file="ood/ifeval_loose_test.jsonl",
        hub=_hub(
            "google/IFEval",
            split="train",
            question="prompt",
            answer=None,
            instruction_ids="instruction_id_list",
            instruction_kwargs="kwargs",
        ),
    ),
    Benchmark(
        name="mmlu_pro",
        title="MMLU-Pro",
        suite="ood",
        scorer="mc",
        file="ood/mmlu_pro.jsonl",
        hub=_hub("TIGER-Lab/MMLU-Pro", split="test", choices="options", **_MC_HUB),
    ),
    Benchmark(
        name="supergpqa",
        title="SuperGPQA",
        suite="ood",
        scorer="mc",
        file="ood/supergpqa.jsonl",
        hub=_hub("m-a-p/SuperGPQA", split="train", choices="options", answer="answer_letter", **_MC_HUB),
    ),
    Benchmark(
        name="safety",
        title="Safety",
        suite="ood",
        scorer="mc",
        file="ood/safety_benchmark.jsonl",
        test_file="ood/safety_benchmark_test.jsonl",
        hub=None,
    ),
    Benchmark(
        name="truthfulqa_mc",
        title="TruthfulQA-MC",
        suite="ood",
        scorer="mc",
        file="ood/truthful_qa_mc.jsonl",
        test_file="ood/truthful_qa_mc_test.jsonl",
        hub=_hub(
            "truthfulqa/truthful_qa",
            name="multiple_choice",
            split="validation",
            choices="mc1_targets.choices",
            answer="mc1_targets.labels",
            answer_format="onehot",
            shuffle_choices=True,
        ),
    ),
    # ---- in paper-data but not among the paper's reported OOD benchmarks: run when named
    Benchmark(
        name="arc_c",
        title="ARC-C",
        suite="ood",
        scorer="mc",
        file="ood/arc_c.jsonl",
        test_file="ood/arc_c_test.jsonl",
        default=False,
        hub=_hub(
            "allenai/ai2_arc",
            name="ARC-Challenge",
            split="test",
            choices="choices.text",
            answer="answerKey",
            **_MC_HUB,
        ),
    ),
    Benchmark(
        name="commonsenseqa",
        title="CommonsenseQA",
        suite="ood",
        scorer="mc",
        file="ood/commonsenseqa.jsonl",
        test_file="ood/commonsenseqa_test.jsonl",
        default=False,
        hub=_hub(
            "tau/commonsense_qa", split="validation", choices="choices.text", answer="answerKey", **_MC_HUB
        ),
    ),
)


def builtin_registry() -> dict[str, Benchmark]:
    return {b.name: b for b in BUILTIN_BENCHMARKS}


def parse_benchmark_entries(entries: Any, where: str) -> list[Benchmark]:
    """Validate a list of benchmark entries (dicts) into ``Benchmark`` objects."""
    if not isinstance(entries, list):
        raise EvalConfigError(
            f"{where}: 'benchmarks' must be a list of entries, got {type(entries).__name__}. Fix: "
            "benchmarks: [{name: my_math, suite: id, scorer: math, file: id/my_math.jsonl, k: 4}]"
        )
    out: list[Benchmark] = []
    for i, entry in enumerate(entries):
        try:
            out.append(Benchmark.model_validate(entry))
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(p) for p in err["loc"]) or "entry"
            raise EvalConfigError(
                f"{where}: benchmarks[{i}].{field}: {err['msg']}. Fix: an entry needs name, suite (id|ood), "
                "scorer (math|mc|ifeval) and file (JSONL relative to the data dir) or hub"
            ) from None
        if out[-1].file is None and out[-1].hub is None:
            raise EvalConfigError(
                f"{where}: benchmarks[{i}] ({out[-1].name}) has neither 'file' nor 'hub'. Fix: give the JSONL "
                "file relative to the data dir"
            )
    return out


def load_benchmark_entries(path: str | Path) -> list[Benchmark]:
    """Benchmarks declared in a YAML file: a list, or a mapping with a ``benchmarks:`` list."""
    path = Path(path)
    if not path.is_file():
        raise EvalConfigError(f"benchmarks file {path} does not exist. Fix: pass an existing YAML file")
    data = yaml.safe_load(path.read_text())
    if isinstance(data, dict):
        data = data.get("benchmarks")
    return parse_benchmark_entries(data, str(path))


def build_registry(extra: list[Benchmark] | None = None) -> dict[str, Benchmark]:
    """Built-in benchmarks plus extras (an extra with a built-in's name replaces it)."""
    registry = builtin_registry()
    for bench in extra or []:
        registry[bench.name] = bench
    return registry


def resolve_benchmarks(
    selection: list[str], registry: dict[str, Benchmark], exclude: list[str] | None = None
) -> list[Benchmark]:
    """Expand suite names (``id``, ``ood``, ``all``) and benchmark names into benchmarks, in order.

    A suite brings its ``default`` benchmarks (config-declared extras are ``default`` unless they say
    otherwise); ``all`` brings every registered benchmark. Unknown names fail with the list of known ones.
    """
    exclude = list(exclude or [])
    known = sorted(set(registry) | {"id", "ood", "all"})
    for name in [*selection, *exclude]:
        key = name.removeprefix(TASK_PREFIX)
        if key not in registry and key not in ("id", "ood", "all"):
            raise EvalConfigError(
                f"suite/tasks: unknown benchmark or suite {name!r}. Fix: use one of {', '.join(known)}"
            )
    chosen: list[Benchmark] = []
    for name in selection:
        key = name.removeprefix(TASK_PREFIX)
        if key == "all":
            members = list(registry.values())
        elif key in SUITES:
            members = [b for b in registry.values() if b.suite == key and b.default]
        else:
            members = [registry[key]]
        for bench in members:
            if bench.name not in {b.name for b in chosen}:
                chosen.append(bench)
    excluded = {name.removeprefix(TASK_PREFIX) for name in exclude}
    chosen = [b for b in chosen if b.name not in excluded]
    if not chosen:
        raise EvalConfigError(
            f"suite/tasks: {selection} minus {sorted(excluded)} selects no benchmark. Fix: name a suite "
            f"(id, ood, all) or benchmarks from {', '.join(sorted(registry))}"
        )
    return chosen
