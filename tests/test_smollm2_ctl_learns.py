"""CTL learns on a real LM: a few updates on SmolLM2 infilling (T = 2, c = 1) lower KL(σ‖q).

σ(s | o) ∝ p₀(s) p₀(o | s) for one conditioning token o: the o drawn most often among joint
samples of p₀ (its pairs are exact samples of σ(· | o)). CTL trains the paper's conditional MLP
head on the frozen body with its infilling positives (conditional SMC around an exact sample of
that o, ``positives=csmc``), K = 16 particles, lr 3e-4, Adam as ``smclm train``. The change of

    KL(σ‖q) = E_σ[log σ] − E_σ[log q]

is −(change of G_q), the mean log q of held-out exact samples of σ(· | o) (the constant E_σ log σ
cancels), estimated with paired differences on the same samples; the test asks for a decrease of
more than k = 3 standard errors. With the learning rate set to 0 the twist does not move, the
change is exactly 0, and the test fails (checked by hand: ``SMCLM_TEST_CTL_LR=0``).

What this does not show: learning amortised over o (E_o KL(σ‖q) with fresh o's; the Table-8
`cpu` profile, docs/results/table8_smollm2_cpu.md, where no learner lowers it at CPU sizes).
"""

import os
from collections import Counter

import torch
from hydra import compose, initialize_config_module

from smclm.build import build_world
from smclm.methods.base import TrainContext

LR = float(os.environ.get("SMCLM_TEST_CTL_LR", "3e-4"))
UPDATES, K, N_JOINT, SE_K = 20, 16, 1600, 3.0


def test_a_few_ctl_updates_on_smollm2_infilling_lower_kl_sigma_q():
    with initialize_config_module("smclm.configs", version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "experiment=infilling_2",
                "model=smollm2",
                "model.dtype=float32",  # the same arithmetic on every CPU
                "twist=mlp",
                "twist.output=embedding",
                "method=ctl",
                "method.positives=csmc",
                f"method.lr={LR}",
                "device=cpu",
                "seed=0",
            ],
        )
    world = build_world(cfg)
    model, task = world.model, world.task
    with torch.no_grad():
        s, o = task.sample_joint(model, N_JOINT, torch.Generator().manual_seed(0))
    o_id, count = Counter(o[:, 0].tolist()).most_common(1)[0]
    mine = s[o[:, 0] == o_id]
    assert count >= 40, f"the most frequent o has only {count} exact samples"
    train_s, held = mine[::2], mine[1::2]  # positives' pins / held-out evaluation samples
    cond = torch.tensor([[o_id]])

    def log_q_held() -> torch.Tensor:
        with torch.no_grad():
            c = cond.expand(len(held), -1)
            return model.sequence_log_probs(task.prompt_ids, held, c)["log_q"].sum(1)

    gen = torch.Generator().manual_seed(0)
    batch = TrainContext(model, task, K, gen, cfg.smc.resampling, None, group_size=K)
    batch.cond = cond.expand(K, -1)
    params = [p for p in model.trainables().parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=float(cfg.optimizer.lr), betas=(0.9, 0.999), eps=1e-8)
    before = log_q_held()
    for _ in range(UPDATES):
        pick = torch.randint(len(train_s), (K,), generator=gen)
        batch.exact_pool = train_s[pick]  # the exact s of each row's o (the same o)
        loss, _ = world.learner.loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    diff = -(log_q_held() - before)  # per held-out sample: the change of log σ − log q
    d_kl, se = float(diff.mean()), float(diff.std() / len(diff) ** 0.5)
    assert d_kl + SE_K * se < 0, (
        f"KL(σ‖q) changed by {d_kl:+.3f} ± {se:.3f} nats after {UPDATES} CTL updates "
        f"(o = token {o_id}, {len(held)} held-out exact samples)"
    )
