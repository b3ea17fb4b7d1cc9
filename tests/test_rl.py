"""The RL stage's parts that need no sweep: the reward (the evaluation's own answer checks), the overlong
penalty, the prompt data, the settings' checks, and DAPO through TRL's GRPOTrainer raising the reward of a
tiny random model on a planted task."""

from __future__ import annotations

import json

import pytest
from rpsft.core.errors import DataError
from rpsft.evaluation.rewards import BoxedAnswerReward, completion_text, overlong_penalty
from rpsft.evaluation.rl_prompts import is_closed_form, load_rl_prompts, row_to_rl_prompt
from rpsft.sweeps.config.errors import SweepConfigError
from rpsft.sweeps.stages.rl import RLSettings, load_rl_settings
from test_evaluation_answers import HARD_MATH_CASES

# ------------------------------------------------------------------------------------------------ rewards


@pytest.mark.parametrize("gold, response, expected", HARD_MATH_CASES)
def test_reward_is_the_evaluations_verdict_on_hard_answers(gold, response, expected):
    reward = BoxedAnswerReward()
    assert reward([response], answer=[gold]) == [1.0 if expected else 0.0]
    as_chat = [[{"role": "assistant", "content": response}]]  # conversational completions
    assert reward(as_chat, answer=[gold]) == [1.0 if expected else 0.0]


def test_reward_scores_each_completion_against_its_own_answer():
    reward = BoxedAnswerReward()
    completions = [r"\boxed{7}", r"\boxed{7}", r"so \boxed{\frac{1}{2}}", "no box: 7"]
    assert reward(completions, answer=["7", "8", "0.5", "7"]) == [1.0, 0.0, 1.0, 0.0]
    assert (
        completion_text([{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}])
        == "a\nb"
    )


def test_overlong_penalty_is_dapos_soft_punishment():
    penalty = overlong_penalty(max_completion_length=100, buffer=20)
    # 0 up to 80 tokens, then linear to -1 at 100 (Eq. 13 of DAPO), by hand
    assert penalty([[1] * 80, [1] * 90, [1] * 100, [1] * 10]) == pytest.approx([0.0, -0.5, -1.0, 0.0])


# ------------------------------------------------------------------------------------------------ prompts


def test_champ_prompts_are_deterministic_closed_form_and_boxed_style():
    first = load_rl_prompts("champ:train")
    again = load_rl_prompts("champ:train")
    assert first == again and len(first) > 50
    heldout = load_rl_prompts("champ:heldout")
    assert not {p["prompt"][1]["content"] for p in first} & {p["prompt"][1]["content"] for p in heldout}
    for prompt in first:
        system, user = prompt["prompt"]
        assert system["role"] == "system" and "\\boxed{}" in system["content"]
        assert user["role"] == "user" and user["content"].strip()
        assert is_closed_form(prompt["answer"])
    assert load_rl_prompts("champ:train:5") == first[:5]
    with pytest.raises(DataError, match="closed-form answer"):
        load_rl_prompts("champ:heldout:200")


def test_demo_math_prompts_take_the_reference_solutions_boxed_answer():
    from rpsft.core.data import load_examples

    examples = load_examples("demo-math:6")
    prompts = load_rl_prompts("demo-math:6")
    assert [p["prompt"][1]["content"] for p in prompts] == [e[-2]["content"] for e in examples]
    for prompt, example in zip(prompts, examples):
        assert example[-1]["content"].endswith(f"\\boxed{{{prompt['answer']}}}.")
        assert BoxedAnswerReward()([example[-1]["content"]], answer=[prompt["answer"]]) == [1.0]


def test_closed_form_rule():
    assert is_closed_form("3/2") and is_closed_form("2^(m+1)") and is_closed_form("sqrt(3)/3")
    assert is_closed_form("(x=8, y=2), (x=2, y=8)")
    assert not is_closed_form("No") and not is_closed_form("0 is the only possible value")


def test_dapo_math_rows_and_plain_rows(tmp_path):
    wrapped = (
        "Solve the following math problem step by step. The last line of your response should be of the form "
        "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\nWhat is 2+3?\n\n"
        'Remember to put your answer on its own line after "Answer:".'
    )
    rows = [
        {"prompt": [{"role": "user", "content": wrapped}], "reward_model": {"ground_truth": "5"}},
        {"problem": "What is 6*7?", "answer": 42},
        {
            "messages": [
                {"role": "user", "content": "What is 9-4?"},
                {"role": "assistant", "content": r"9-4 = \boxed{5}"},
            ]
        },
    ]
    path = tmp_path / "rl.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    prompts = load_rl_prompts(str(path))
    assert [p["prompt"][1]["content"] for p in prompts] == ["What is 2+3?", "What is 6*7?", "What is 9-4?"]
    assert [p["answer"] for p in prompts] == ["5", "42", "5"]
    with pytest.raises(DataError, match="boxed"):
        row_to_rl_prompt(
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "5"}]}, "r"
        )
    with pytest.raises(DataError, match="no final answer"):
        row_to_rl_prompt({"problem": "x"}, "row 3")
    with pytest.raises(DataError, match="rl.data"):
        load_rl_prompts("no-such-file.jsonl")


# ------------------------------------------------------------------------------------------------ settings


def test_settings_checks_name_the_field(tmp_path):
    with pytest.raises(SweepConfigError, match="micro_batch"):
        RLSettings(prompts_per_step=3, num_generations=4, micro_batch=8).grad_accum()
    assert RLSettings(prompts_per_step=256, num_generations=8, micro_batch=8).grad_accum(world_size=8) == 32
    path = tmp_path / "rl.yaml"
    path.write_text("rl:\n  max_completion_length: 64\n  overlong_buffer: 64\n")
    with pytest.raises(SweepConfigError, match="overlong_buffer"):
        load_rl_settings(path)
    path.write_text("rl:\n  learning_rate: -1\n")
    with pytest.raises(SweepConfigError, match="learning_rate"):
        load_rl_settings(path)
    assert load_rl_settings(None, {"max_steps": 3}).max_steps == 3


# ------------------------------------------------------------------------------------------------ DAPO


def planted_task():
    """A 6-token vocabulary and a random tiny Llama: the prompt shows the answer; reward 1 only for a
    completion whose last box holds 7 (``\\boxed{ 7 }``: three tokens in order)."""
    from rpsft.core.models import tiny_model
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = ["<pad>", "<eos>", "\\boxed{", "}", "3", "7"]
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")
    model = tiny_model("llama", vocab_size=len(vocab), seed=0)
    for config in (model.config, model.generation_config):
        config.pad_token_id, config.eos_token_id = 0, 1
    prompts = [{"prompt": "7 \\boxed{ 7 }", "answer": "7"}] * 64
    return model, tokenizer, prompts


def planted_settings(**overrides):
    """64 responses of up to 6 tokens per step (4 prompts x 16), no overlong window, no KL probe."""
    values = dict(
        learning_rate=3e-3,
        prompts_per_step=4,
        num_generations=16,
        micro_batch=64,
        max_completion_length=6,
        overlong_buffer=0,
        mask_truncated_completions=False,
        kl_probe=0,
    )
    return RLSettings(**{**values, **overrides})


@pytest.mark.slow
def test_dapo_raises_the_reward_on_a_planted_task(tmp_path):
    from rpsft.sweeps.stages.rl import grpo_trainer

    model, tokenizer, prompts = planted_task()
    trainer = grpo_trainer(model, tokenizer, prompts, planted_settings(max_steps=40), tmp_path / "out")
    assert trainer.args.loss_type == "dapo" and trainer.args.beta == 0.0
    assert (trainer.args.epsilon, trainer.args.epsilon_high) == (0.2, 0.28)
    trainer.train()
    rewards = [h["rewards/boxed_answer/mean"] for h in trainer.state.log_history if "reward" in h]
    assert len(rewards) == 40
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert first < 0.15 and last > first + 0.3, rewards


def _protected_drift(model, initial, k):
    """sum over the q/k/v/o and MLP matrices of ||Uk^T (W - W0) Vk||_F^2, in float64 from a fresh SVD of W0."""
    import torch

    total = 0.0
    for name, weight in model.named_parameters():
        if name.endswith("proj.weight"):
            w0 = initial[name].double()
            u, _, vh = torch.linalg.svd(w0, full_matrices=False)
            block = u[:, :k].T @ (weight.detach().double() - w0) @ vh[:k].T
            total += float((block**2).sum())
    return total


@pytest.mark.slow
def test_rl_penalty_keeps_the_protected_block_near_the_start(tmp_path):
    from rpsft.sweeps.stages.rl import RLPenalty, grpo_trainer

    drifts = {}
    for label, penalty in (("off", None), ("on", RLPenalty(k=4, lam=1000.0, layers="all"))):
        model, tokenizer, prompts = planted_task()
        initial = {n: p.detach().clone() for n, p in model.named_parameters()}
        settings = planted_settings(max_steps=15, penalty=penalty)
        trainer = grpo_trainer(model, tokenizer, prompts, settings, tmp_path / label)
        trainer.train()
        drifts[label] = _protected_drift(trainer.model, initial, k=4)
        if penalty is not None:  # the penalty gradient went in at every optimizer step
            from rpsft.core.trainer import RPSFTCallback

            (callback,) = [c for c in trainer.callback_handler.callbacks if isinstance(c, RPSFTCallback)]
            assert callback.regularizer.last_step_applied == 14 and callback.last_penalty > 0
    assert drifts["on"] < 0.5 * drifts["off"], drifts


@pytest.mark.slow
def test_rl_from_a_checkpoint_without_a_sweep(tiny_dir, tmp_path, monkeypatch):
    from rpsft.sweeps.stages.rl import run_rl
    from rpsft.sweeps.store import tracking

    monkeypatch.chdir(tmp_path)
    settings = RLSettings(
        data="demo-math:8",
        max_steps=2,
        prompts_per_step=2,
        num_generations=2,
        micro_batch=4,
        max_completion_length=8,
        overlong_buffer=2,
        kl_probe=2,
    )
    (outcome,) = run_rl(settings, model=str(tiny_dir), progress=False, echo=lambda *a: None)
    assert outcome.init_scores is None and (outcome.chosen_dir / "config.json").is_file()
    client = tracking.client_for(f"sqlite:///{tmp_path / 'runs/rl/mlflow.db'}")
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["rpsft.role"] == "rl"
    assert run.data.tags["rpsft.init_trial"] == str(tiny_dir)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "rl/kl_to_init")] == [1, 2]
    assert len(outcome.rewards) == 2
