"""PPO/GRPO pieces without Ray: rollout masks, log-probs and values, rewards, KL control, config.

Invariants used: a forward over a left-padded rollout reproduces the log-probs generation
sampled from (position ids follow the mask); a causal value model's value at a response
position equals its pooled score of the sequence cut right after that position.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from configs import ConfigError, RayftConfig
from jobs.losses import masked_mean
from jobs.ppo.rewards import (
    RewardError,
    RewardService,
    RewardSpec,
    call_reward_funcs,
    check_reward_source,
    load_reward_funcs,
)
from jobs.ppo.rollout import (
    AdaptiveKLController,
    Rollout,
    RunningMoments,
    SamplingSettings,
    concat_rollouts,
    generate_rollout,
    kl_penalised_rewards,
    left_pad,
    mask_after_eos,
    response_logps,
    response_values,
)
from jobs.ppo.worker import _reference, rollout_steps
from jobs.preflight import load_run_config

ROOT = Path(__file__).resolve().parents[2]
EOS, PAD = 0, 5


def test_left_pad_and_mask_after_first_eos() -> None:
    ids, mask = left_pad([[7, 8, 9], [4]], PAD)
    assert ids.tolist() == [[7, 8, 9], [PAD, PAD, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    response = torch.tensor([[11, EOS, 12, EOS], [EOS, 3, 3, 3], [13, 14, 15, 16]])
    kept, keep = mask_after_eos(response, [EOS], PAD)
    # The eos itself belongs to the response; everything after it is padding.
    assert keep.tolist() == [[True, True, False, False], [True, False, False, False], [True] * 4]
    assert kept.tolist() == [[11, EOS, PAD, PAD], [EOS, PAD, PAD, PAD], [13, 14, 15, 16]]


def test_concat_rollouts_pads_prompts_left_and_responses_right() -> None:
    a = Rollout(
        torch.tensor([[1, 2]]), torch.tensor([[1, 1]]), torch.tensor([[3]]), torch.tensor([[True]])
    )
    b = Rollout(
        torch.tensor([[4]]),
        torch.tensor([[1]]),
        torch.tensor([[5, 6]]),
        torch.tensor([[True, True]]),
    )
    merged = concat_rollouts([a, b], PAD)
    assert merged.sequences.tolist() == [[1, 2, 3, PAD], [PAD, 4, 5, 6]]
    assert merged.attention_mask.tolist() == [[1, 1, 1, 0], [0, 1, 1, 1]]
    assert merged.position_ids.tolist() == [[0, 1, 2, 2], [0, 0, 1, 2]]
    assert merged.prompts() == [[1, 2], [4]] and merged.completions() == [[3], [5, 6]]


def test_rollout_logps_reproduce_generation_with_left_padding(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompts = [[20, 21, 22, 23, 24], [30, 31]]
    ids, mask = left_pad(prompts, PAD)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=6,
            do_sample=False,
            min_new_tokens=6,
            pad_token_id=PAD,
            output_logits=True,
            return_dict_in_generate=True,
        )
    response = out.sequences[:, ids.size(1) :]
    sampled = (
        torch.stack(out.logits, dim=1)
        .log_softmax(-1)
        .gather(-1, response.unsqueeze(-1))
        .squeeze(-1)
    )
    rollout = Rollout(ids, mask, response, torch.ones_like(response, dtype=torch.bool))
    with torch.no_grad():
        ours = response_logps(model, rollout, temperature=0.0)
    torch.testing.assert_close(ours, sampled, atol=1e-4, rtol=1e-4)
    masked = Rollout(ids, mask, response, torch.tensor([[True] * 6, [True, True] + [False] * 4]))
    with torch.no_grad():
        partial = response_logps(model, masked, temperature=0.0)
    assert (partial[1, 2:] == 0).all()
    torch.testing.assert_close(partial[0], sampled[0], atol=1e-4, rtol=1e-4)


def test_generated_rollouts_group_repeats_and_stop_at_eos(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).train()
    settings = SamplingSettings(
        max_new_tokens=5, temperature=0.0, top_p=1.0, top_k=0, eos_ids=(EOS,), pad_id=PAD
    )
    rollout = generate_rollout(model, [[20, 21, 22], [30]], settings=settings, repeats=2)
    assert model.training  # generation switches to eval and back
    assert rollout.prompts() == [[20, 21, 22], [20, 21, 22], [30], [30]]
    completions = rollout.completions()
    assert completions[0] == completions[1] and completions[2] == completions[3]  # greedy
    for ids in completions:
        assert 1 <= len(ids) <= 5 and EOS not in ids[:-1]


def test_full_finetuning_reference_is_a_frozen_copy_of_the_base(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    config = RayftConfig(
        model_name_or_path=str(tiny_model_dir),
        finetuning_type="full",
        output_dir=str(tmp_path),
    )
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        policy.lm_head.weight.add_(1.0)  # the trained policy moved away from the base
    reference, context = _reference(config, policy, dtype=torch.float32)
    assert reference is not policy and not any(p.requires_grad for p in reference.parameters())
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids, mask = left_pad([[20, 21]], PAD)
    rollout = Rollout(ids, mask, torch.tensor([[40, 41]]), torch.ones(1, 2, dtype=torch.bool))
    with torch.no_grad(), context():
        torch.testing.assert_close(
            response_logps(reference, rollout, temperature=0.0),
            response_logps(base, rollout, temperature=0.0),
        )


def test_temperature_scales_the_logits(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids, mask = left_pad([[20, 21, 22]], PAD)
    rollout = Rollout(ids, mask, torch.tensor([[40, 41]]), torch.ones(1, 2, dtype=torch.bool))
    with torch.no_grad():
        logits = model(input_ids=rollout.sequences).logits[:, 2:4] / 0.7
        expected = logits.log_softmax(-1).gather(-1, torch.tensor([[[40], [41]]])).squeeze(-1)
        torch.testing.assert_close(response_logps(model, rollout, temperature=0.7), expected)


def test_values_per_token_equal_the_pooled_score_of_each_prefix(tiny_model_dir: Path) -> None:
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1).eval()
    model.config.pad_token_id = PAD
    prompt, response = [20, 21, 22], [40, 41, 42]
    rollout = Rollout(
        torch.tensor([prompt]),
        torch.ones(1, 3, dtype=torch.long),
        torch.tensor([response]),
        torch.ones(1, 3, dtype=torch.bool),
    )
    with torch.no_grad():
        values = response_values(model, model.score, rollout)
        # Entry j is the value of the state before response token j: the score of the prefix.
        pooled = [
            model(input_ids=torch.tensor([prompt + response[:j]])).logits.item() for j in range(3)
        ]
    torch.testing.assert_close(values[0], torch.tensor(pooled), atol=1e-5, rtol=1e-5)


def test_values_of_a_lora_value_model_use_its_trained_head(tiny_model_dir: Path) -> None:
    from peft import LoraConfig, get_peft_model

    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    base.config.pad_token_id = PAD
    model = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=2, target_modules="all-linear"))
    with torch.no_grad():
        model.score.weight.add_(1.0)  # the adapter's copy of the head (modules_to_save)
    rollout = Rollout(
        torch.tensor([[20, 21]]),
        torch.ones(1, 2, dtype=torch.long),
        torch.tensor([[40, 41]]),
        torch.ones(1, 2, dtype=torch.bool),
    )
    with torch.no_grad():
        values = response_values(model, model.score, rollout)
        pooled = model(input_ids=torch.tensor([[20, 21, 40]])).logits.item()
    assert values[0, 1].item() == pytest.approx(pooled, abs=1e-5)


def test_kl_rewards_put_the_score_on_the_last_response_token() -> None:
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-2.0, -1.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    rewards, kl = kl_penalised_rewards(torch.tensor([1.0, 2.0]), logps, ref, mask, kl_coef=0.1)
    torch.testing.assert_close(kl, torch.tensor([[0.5, 0.0, -1.0], [1.0, 0.0, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.0, 1.1], [-0.1, 2.0, 0.0]]))


def test_adaptive_kl_controller_follows_trl() -> None:
    """TRL 0.9 `AdaptiveKLController.update`: clip(kl / target - 1, +-0.2) * n / horizon."""
    control = AdaptiveKLController(value=0.2, target=6.0, horizon=10000)
    control.update(12.0, n_steps=100)  # error clipped to +0.2
    assert control.value == pytest.approx(0.2 * (1 + 0.2 * 100 / 10000))
    before = control.value
    control.update(5.4, n_steps=100)  # error -0.1
    assert control.value == pytest.approx(before * (1 - 0.1 * 100 / 10000))


def test_running_moments_equal_the_statistics_of_all_scores() -> None:
    first, second = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([0.0, 8.0])
    moments = RunningMoments()
    moments.update(first)
    moments.update(second)
    everything = torch.cat((first, second)).double()
    assert moments.mean == pytest.approx(everything.mean().item())
    assert moments.std == pytest.approx(everything.std().item())  # unbiased, as TRL's
    normalised = moments.normalise(second)
    assert normalised[1].item() == pytest.approx((8.0 - moments.mean) / moments.std, rel=1e-5)


def test_masked_mean_ignores_padding_of_short_responses() -> None:
    values = torch.tensor([[1.0, 3.0], [5.0, 100.0]])
    assert masked_mean(values, torch.tensor([[True, True], [True, False]])).item() == 3.0


@pytest.fixture
def reward_module(monkeypatch: pytest.MonkeyPatch) -> str:
    module = types.ModuleType("rayft_test_rewards")
    module.length = lambda prompts, completions, completion_ids, **kw: [
        float(len(c)) for c in completion_ids
    ]
    module.half = lambda prompts, completions, completion_ids, **kw: [0.5, None]
    module.short = lambda prompts, completions, completion_ids, **kw: [1.0]
    module.text = lambda prompts, completions, completion_ids, **kw: ["high", "low"]
    module.not_callable = 3
    monkeypatch.setitem(sys.modules, "rayft_test_rewards", module)
    return "rayft_test_rewards"


def test_reward_functions_are_summed_and_none_is_skipped(reward_module: str) -> None:
    paths = [f"{reward_module}:length", f"{reward_module}:half"]
    funcs = load_reward_funcs(paths)
    scores = call_reward_funcs(
        funcs, paths, prompts=["p", "q"], completions=["a", "bc"], completion_ids=[[1], [2, 3]]
    )
    assert scores == [1.5, 2.0]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("no_such_module_xyz:f", "cannot import module `no_such_module_xyz`"),
        ("{module}:missing", "has no function `missing`"),
        ("{module}:not_callable", "has no function `not_callable`"),
    ],
)
def test_reward_function_import_errors_name_the_path(
    reward_module: str, name: str, message: str
) -> None:
    with pytest.raises(RewardError, match=message):
        load_reward_funcs([name.format(module=reward_module)])


@pytest.mark.parametrize(
    ("name", "message"), [("short", "one float per completion"), ("text", "non-number")]
)
def test_reward_function_bad_returns_are_reported(
    reward_module: str, name: str, message: str
) -> None:
    path = f"{reward_module}:{name}"
    with pytest.raises(RewardError, match=message):
        call_reward_funcs(
            load_reward_funcs([path]),
            [path],
            prompts=["p", "q"],
            completions=["a", "b"],
            completion_ids=[[1], [2]],
        )


def _spec(path: Path | None, kind: str, base: Path, funcs: tuple[str, ...] = ()) -> RewardSpec:
    return RewardSpec(
        reward_model=str(path) if path else None,
        reward_model_type=kind,
        base_model=str(base),
        reward_funcs=funcs,
        pad_id=PAD,
        trust_remote_code=False,
        threads=1,
    )


def test_reward_service_scores_with_a_full_and_a_lora_reward_model(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from peft import LoraConfig, get_peft_model

    full = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    full.save_pretrained(tmp_path / "full")
    lora = get_peft_model(
        AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1),
        LoraConfig(task_type="SEQ_CLS", r=2, target_modules="all-linear"),
    )
    lora.save_pretrained(tmp_path / "lora")
    sequences = [[20, 21, 22, 40], [30, 41]]
    for kind, model in (("full", full), ("lora", lora)):
        service = RewardService(_spec(tmp_path / kind, kind, tiny_model_dir))
        scores = service.score(["", ""], ["", ""], [[40], [41]], sequences)
        with torch.no_grad():
            expected = [
                model.eval()(input_ids=torch.tensor([row])).logits.item() for row in sequences
            ]
        assert scores == pytest.approx(expected, abs=1e-5), kind  # right padding is not scored


def test_a_reward_model_of_the_wrong_type_says_which_type(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    AutoModelForSequenceClassification.from_pretrained(
        tiny_model_dir, num_labels=1
    ).save_pretrained(tmp_path / "rm")
    with pytest.raises(RewardError, match="set reward_model_type: full"):
        check_reward_source(_spec(tmp_path / "rm", "lora", tiny_model_dir))


def _ppo_values(model_dir: Path, tmp_path: Path, **keys: object) -> Path:
    values = {
        "model_name_or_path": str(model_dir),
        "template": "qwen",
        "dataset": "alpaca_en_demo",
        "dataset_dir": str(ROOT / "data"),
        "output_dir": str(tmp_path / "out"),
        **keys,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def test_ppo_without_a_reward_names_the_keys_to_set(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_run_config(_ppo_values(tiny_model_dir, tmp_path, stage="ppo"))
    assert "`reward_model`" in str(caught.value) and "`reward_funcs`" in str(caught.value)


def test_rollout_keys_of_another_stage_are_errors(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ppo_epochs applies to stage ppo only"):
        load_run_config(_ppo_values(tiny_model_dir, tmp_path, stage="sft", ppo_epochs=2))
    with pytest.raises(ConfigError, match="num_generations applies to stage grpo only"):
        load_run_config(
            _ppo_values(
                tiny_model_dir, tmp_path, stage="ppo", reward_funcs=["m:f"], num_generations=4
            )
        )
    with pytest.raises(ConfigError, match="not an import path"):
        load_run_config(_ppo_values(tiny_model_dir, tmp_path, stage="grpo", reward_funcs=["m.f"]))


def test_ppo_config_with_llamafactory_keys_loads(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = load_run_config(
        _ppo_values(
            tiny_model_dir,
            tmp_path,
            stage="ppo",
            reward_model="saves/rm",
            reward_model_type="full",
            ppo_epochs=2,
            ppo_buffer_size=2,
            ppo_target=3.0,
            ppo_score_norm=True,
            ppo_whiten_rewards=True,
            top_k=10,
        )
    )
    assert (config.ppo_epochs, config.ppo_buffer_size, config.ppo_target) == (2, 2, 3.0)
    # An epoch of 10 micro-batches makes ceil(10 / (2 accum x 2 buffers)) = 3 rollout steps.
    accum = config.model_copy(update={"gradient_accumulation_steps": 2, "num_train_epochs": 1.0})
    assert rollout_steps(accum, micro_per_epoch=10, planned=5) == 3
