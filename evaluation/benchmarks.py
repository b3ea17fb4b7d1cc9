"""The registry of benchmarks: the paper's ID math and OOD benchmarks, and the extras a config declares.

A benchmark is data, not code. The built-in ones are YAML files under ``evaluation/builtin/`` (one per
benchmark), read by the same loader as a user's entries (:func:`load_benchmark_entries`), so adding one means
adding a file. An entry holds a name, a suite (``id`` or ``ood``), a scorer (``math``: ``\\boxed{}`` answer
checked by math-verify; ``mc``: option letter; ``ifeval``: lm-eval's loose IFEval checkers), the JSONL file under
a data dir (the format of ``shared/paper-data``), an optional smaller ``_test`` file, the hub source for users
without the files, and the paper's number of samples ``k``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from rpsft.core.errors import InputError

Suite = Literal["id", "ood"]
Scorer = Literal["math", "mc", "ifeval"]
SUITES: tuple[str, ...] = ("id", "ood")
TASK_PREFIX = "rpsft_"
DEFAULT_SAMPLES = 4  # samples per item where neither the entry nor the file says (the paper's OOD k)

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


def read_task_yaml(path: Path) -> dict[str, Any]:
    """An lm-eval task YAML file as written (its ``include:`` not followed, ``!function`` tags read as None)."""

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    try:
        config = yaml.load(path.read_text(), Loader=Loader)
    except yaml.YAMLError:
        return {}
    return config if isinstance(config, dict) else {}


def _task_name(task: str) -> str:
    """The name a task entry gets by default: the ``task:`` of its YAML file, else the file's or folder's stem, else
    the registry name itself."""
    path = Path(task).expanduser()
    named = read_task_yaml(path).get("task") if path.is_file() else None
    if isinstance(named, str):
        return named
    return path.name.removesuffix(".yaml").removesuffix(".yml") if path.suffix or path.is_dir() else task


class Benchmark(BaseModel):
    """One benchmark: items in a file (``file``/``test_file``, relative to the data dir or absolute) or on the hub,
    scored by one of rpsft's scorers; or an lm-eval task (``task``: a registry name, a task YAML or a directory
    of task YAML), scored by the task's own primary metric."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = Field("", description="default for a task entry: the task's name")
    title: str = ""
    suite: Suite
    scorer: Scorer | None = Field(None, description="math, mc or ifeval; none for a task entry")
    task: str | None = Field(
        None,
        description="an lm-eval task: a registry name (gsm8k, arc_challenge, mmlu_pro, ...), or a path to a task "
        "YAML file or a directory of them (see --include-path)",
    )
    file: str | None = None
    test_file: str | None = None
    hub: HubSource | None = None
    k: int | None = Field(
        None,
        ge=1,
        description="samples per item (Avg@k, Pass@k): the paper's number; by default as many as the file repeats "
        f"each prompt, or {DEFAULT_SAMPLES} where it does not",
    )
    default: bool = Field(True, description="part of its suite when the suite is named")
    has_solutions: bool = Field(False, description="rows carry a reference `solution` (loss-based ID gain)")

    @model_validator(mode="before")
    @classmethod
    def _task_entry(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("task") and not data.get("name"):
            name = _task_name(str(data["task"]))
            data = {**data, "name": re.sub(r"[^a-z0-9_]+", "_", name.lower()).strip("_") or "task"}
        return data

    @model_validator(mode="after")
    def _one_kind(self) -> Benchmark:
        if self.task is not None:
            mixed = [f for f in ("scorer", "file", "test_file", "hub", "k") if getattr(self, f) is not None]
            if mixed or self.has_solutions:
                raise ValueError(
                    f"a task entry is scored by its lm-eval task, so {', '.join(mixed or ['has_solutions'])} "
                    "cannot be set with 'task'. Fix: keep name, title, suite, task and default"
                )
        elif self.scorer is None:
            raise ValueError("a benchmark needs 'scorer' (math, mc or ifeval), or 'task' (an lm-eval task)")
        return self

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not re.fullmatch(r"[a-z0-9][a-z0-9_]*", value):
            raise ValueError(
                f"benchmark name {value!r} must be lowercase letters, digits and '_'. Fix: e.g. 'my_math'"
            )
        return value

    @property
    def is_task(self) -> bool:
        """Whether this entry names an lm-eval task (scored by the task's own metric)."""
        return self.task is not None

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
                "scorer (math|mc|ifeval) and file (JSONL relative to the data dir) or hub; or suite and task "
                "(an lm-eval task name or task YAML)"
            ) from None
        if not out[-1].is_task and out[-1].file is None and out[-1].hub is None:
            raise EvalConfigError(
                f"{where}: benchmarks[{i}] ({out[-1].name}) has neither 'file' nor 'hub'. Fix: give the JSONL "
                "file relative to the data dir"
            )
    return out


def load_benchmark_entries(path: str | Path) -> list[Benchmark]:
    """Benchmarks declared in YAML: a file holding one entry, a list of entries or a mapping with a
    ``benchmarks:`` list; or a directory of such files (``*.yaml``, read in name order)."""
    path = Path(path)
    if path.is_dir():
        return [bench for file in sorted(path.glob("*.yaml")) for bench in load_benchmark_entries(file)]
    if not path.is_file():
        raise EvalConfigError(f"benchmarks file {path} does not exist. Fix: pass an existing YAML file")
    data = yaml.safe_load(path.read_text())
    if isinstance(data, dict):
        data = data["benchmarks"] if "benchmarks" in data else [data]
    return parse_benchmark_entries(data, str(path))


BUILTIN_DIR = Path(__file__).parent / "builtin"


def builtin_registry() -> dict[str, Benchmark]:
    """The built-in benchmarks, one YAML file each under ``evaluation/builtin/``: the in-domain suite first,
    then the out-of-domain one; within a suite the ``default`` members first, each group in name order."""
    benches = sorted(
        load_benchmark_entries(BUILTIN_DIR), key=lambda b: (SUITES.index(b.suite), not b.default, b.name)
    )
    return {b.name: b for b in benches}


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
