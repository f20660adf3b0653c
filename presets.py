"""Every preset and per-size profile, one home each. The modules they configure read them here:
`python cagsr.py --size NAME` is a lookup in a dict below, never a code path.

- the model sizes of both policies (model.config_for, decoder.policy_config);
- the SFT defaults per size (sft.sft_config) and the SFT noise per dataset;
- the RL profile of each kind of run (`python cagsr.py`, --experiment table1, --experiment
  rewards): iterations and PPOConfig fields per size, read by cli/settings.py;
- which presets need a GPU.

Nothing here imports the project: the values are plain data. Parameter counts are printed by
`python model.py` and `python decoder.py`; the paper's own values are in ppo.PAPER and
reward.RewardConfig.
"""

# --------------------------------------------------------------------------------------------
# Model sizes (minGPT style)
# --------------------------------------------------------------------------------------------

# The encoder-decoder (model.EncoderDecoder, the paper's §7.2 model).
SIZES: dict[str, dict] = {
    # CPU-sized: the main job's default; SFT in minutes on 2 cores.
    "tiny": dict(vocab_size=3000, d_model=128, n_heads=4, n_enc_layers=2, n_dec_layers=2, d_ff=512),
    # Still a CPU model, ~6x slower per token than tiny.
    "small": dict(
        vocab_size=4000, d_model=256, n_heads=4, n_enc_layers=4, n_dec_layers=4, d_ff=1024
    ),
    # One GPU: T5-small-like.
    "base": dict(
        vocab_size=8000,
        d_model=512,
        n_heads=8,
        n_enc_layers=6,
        n_dec_layers=6,
        d_ff=2048,
        max_src_len=256,
        max_tgt_len=256,
    ),
    # The paper's scale (§7.2, "approximately 1.3 billion parameters"), T5/BART-like proportions:
    # d_ff = 4 D, head width 64, equal encoder and decoder depth.
    "1.3b": dict(
        vocab_size=32000,
        d_model=1536,
        n_heads=24,
        n_enc_layers=18,
        n_dec_layers=18,
        d_ff=6144,
        max_src_len=512,
        max_tgt_len=512,
    ),
}

# The from-scratch decoder-only policy (decoder.DecoderOnly, §3.1's other configuration), sized
# like the encoder-decoder's preset of the same name (about the same parameters).
DECODER_SIZES: dict[str, dict] = {
    "tiny": dict(vocab_size=3000, d_model=128, n_heads=4, n_kv_heads=2, n_layers=4, d_ff=448),
    "small": dict(vocab_size=4000, d_model=256, n_heads=4, n_kv_heads=2, n_layers=8, d_ff=896),
}

# Presets meant for a GPU: on a CPU they would run for days, so they start there only on request.
GPU_SIZES = ("base", "1.3b")
# A snapshot this large (flan-T5-large, 783M, and up) trains on a GPU, by the same rule.
GPU_SNAPSHOT_PARAMS = 500_000_000

# --------------------------------------------------------------------------------------------
# SFT (§7.2)
# --------------------------------------------------------------------------------------------

# SFTConfig fields per size (USAGE.md, "The SFT stage"): enough steps for most held-out answers to
# be right on a 2-core CPU, leaving room for RL inside the main job's 10 minutes. "pretrained"
# (--init with a snapshot): pretrained weights want a small step (the tiny preset's 2e-3 would
# wreck them); 1e-4 with AdamW is the usual rate for fine-tuning T5.
SFT_DEFAULTS = {
    "tiny": dict(steps=1200, batch_size=64, lr=2e-3),
    "small": dict(steps=3000, batch_size=64, lr=1e-3),
    "base": dict(steps=10000, batch_size=64, lr=5e-4),
    "1.3b": dict(steps=20000, batch_size=64, lr=1e-4),
    "pretrained": dict(steps=1000, batch_size=16, lr=1e-4),
}

# --sft-noise when not given, for a run that trains its SFT model from scratch: the bundled tasks
# with a plausible wrong answer get 30% of their SFT responses made wrong, so that RL has good and
# bad behaviours to choose between (headroom by construction, DECISIONS.md §5; chosen by
# measurement, results/README.md "How the CPU RL settings were chosen"). Every other dataset, and a
# run from --init, gets none.
SFT_NOISE = {"qa-grounded": 0.3, "instruct": 0.3}

# Each experiment's SFT steps per dataset (the size's SFT_DEFAULTS elsewhere). The rewards study
# trains fewer steps than Table 1, so that the policy has room to improve.
EXPERIMENT_SFT_STEPS = {
    "table1": {"instruct": 600},
    "rewards": {"qa": 600, "qa-grounded": 300, "instruct": 200},
}

# --------------------------------------------------------------------------------------------
# RL (§4, §5)
# --------------------------------------------------------------------------------------------

# PPOConfig fields of the CPU presets in `python cagsr.py`, chosen by measurement on the headroom
# tasks (results/README.md, "How the CPU RL settings were chosen"): at the paper's lr 1e-5 nothing
# moves in the few dozen iterations a CPU affords.
RUN_CPU_PPO = dict(
    lr=3e-5, baseline="group", whiten=True, kl_coef=0.1, epochs=4, minibatches=4, temperature=0.5
)
# The experiments' CPU setting: the plain run's without its KL penalty, since the paper has none
# (Table 1's KL row adds it back).
EXPERIMENT_CPU_PPO = {k: v for k, v in RUN_CPU_PPO.items() if k != "kl_coef"}


def _experiment_profile(cpu_iterations: int) -> dict:
    """An experiment's per-size RL profile: EXPERIMENT_CPU_PPO for `cpu_iterations` on the CPU
    presets; the paper's setting (PPOConfig's defaults) on the GPU presets and from a snapshot."""
    cpu = dict(iterations=cpu_iterations, ppo=EXPERIMENT_CPU_PPO)
    return {
        "tiny": cpu,
        "small": cpu,
        "base": dict(iterations=200, ppo={}),
        "1.3b": dict(iterations=500, ppo={}),
        "pretrained": dict(iterations=200, ppo={}),
    }


# The RL profile of each kind of run, per size: iterations, and the PPOConfig fields that differ
# from its defaults (the paper's setting, §7.2). "pretrained" (--init with a snapshot) keeps the
# paper's setting, lr 1e-5 included: the paper's own case is a pretrained model. Table 1 runs 20
# iterations of 8 RL rows x 3 seeds on the CPU; the rewards study 20 iterations, so that its fixed
# set is scored at iterations 0, 10 and 20 of 7 RL rows x 3 seeds.
RL_PROFILES = {
    "run": {
        "tiny": dict(iterations=40, ppo=RUN_CPU_PPO),
        "small": dict(iterations=40, ppo=RUN_CPU_PPO),
        "base": dict(iterations=500, ppo={}),
        "1.3b": dict(iterations=500, ppo={}),
        "pretrained": dict(iterations=200, ppo={}),
    },
    "table1": _experiment_profile(cpu_iterations=20),
    "rewards": _experiment_profile(cpu_iterations=20),
}
