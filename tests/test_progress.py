"""What a user sees while a sweep runs: a progress bar (with its ETA) over the base model's responses and
scores from the start of that work, no Ray token-auth banner on the local default, and a driver table with
each trial's step / max_steps and ETA instead of the Trainer's raw log dicts."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time

import pytest
import yaml
from conftest import PAPER_DATA
from rpsft.evaluation.progress import advance, progress_bar
from sweep_helpers import sweep_dict, tiny_model_dir

BAR = "base model: OOD responses and NLLs"


def test_the_bar_moves_only_while_open_and_counts_every_item(capsys):
    advance(5)  # no bar open: nothing happens, nothing fails
    with progress_bar("work", total=7) as bar:
        advance(3)
        advance(4)
        assert bar.n == 7
    advance(1)
    err = capsys.readouterr().err
    assert "work: 100%" in err and "7/7" in err
    with progress_bar("quiet", total=3, enabled=False) as bar:
        advance(3)
        assert bar is None
    assert "quiet" not in capsys.readouterr().err


@pytest.mark.skipif(not PAPER_DATA.is_dir(), reason="shared/paper-data is not present")
@pytest.mark.slow
@pytest.mark.integration
def test_a_sweep_shows_preparation_progress_at_once_and_no_ray_banner(tmp_path, smol_tokenizer):
    model_dir = tiny_model_dir(tmp_path / "model", smol_tokenizer)
    raw = sweep_dict("progress", model_dir, tmp_path, references=["sft"], search={"num_trials": 1, "seed": 0})
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(raw))
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    proc = subprocess.Popen(
        [sys.executable, "-c", "from rpsft.cli import app; app()", "sweep", "run", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=tmp_path,
    )
    seen: list[tuple[float, str]] = []

    def read() -> None:
        buffer = b""
        for chunk in iter(lambda: proc.stdout.read1(4096), b""):
            buffer += chunk
            *lines, buffer = re.split(rb"[\r\n]", buffer)
            now = time.monotonic()
            seen.extend((now, line.decode(errors="replace")) for line in lines if line.strip())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert proc.wait(600) == 0, "\n".join(line for _, line in seen[-40:])
    reader.join(10)
    text = "\n".join(line for _, line in seen)
    assert "Token authentication is enabled" not in text
    preparing = next(t for t, line in seen if "preparing the base model" in line)
    bar = [(t, line) for t, line in seen if BAR in line]
    assert bar, text[-3000:]
    first, first_line = bar[0]
    assert first - preparing < 10.0, f"the bar appeared {first - preparing:.1f} s after preparation started"
    assert re.search(r"\b0/\d+", first_line), first_line  # shown before the first item is done
    assert any("100%" in line for _, line in bar)
    assert "it/s" in text or "item/s" in text or "s/item" in text  # tqdm's rate (and ETA) on the bar
    # the driver's table: each trial's step / max_steps and its ETA, and no raw Trainer log dicts
    headers = [line for _, line in seen if "| Trial name" in line]
    assert any("| step" in h and "| ETA" in h for h in headers), headers
    assert any(re.search(r"\|\s+2/2\s+\|\s+done\s+\|", line) for _, line in seen), text[-3000:]
    assert "{'loss':" not in text and "'train_runtime'" not in text
