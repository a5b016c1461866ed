"""`smclm sample` (print weighted SMC samples and log Ẑ) and `smclm collect` (fill the
exact-sample cache ahead of training)."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from smclm.build import World, build_world, exact_pool, world_for
from smclm.config import validate
from smclm.smc.sampler import run_smc


def sample(cfg: DictConfig) -> None:
    world, wcfg, _ = world_for(cfg, ("smc", "device"))
    n = int(cfg.n)
    if n < 1:
        raise ValueError(f"n={n} must be a positive number of particles")
    gen = torch.Generator(device=world.device).manual_seed(int(cfg.seed))
    cond = _conditioning(cfg, world, gen)
    res = run_smc(
        world.model,
        world.task.prompt_ids,
        world.task.output_len,
        world.task.bind(cond),
        n,
        cond=cond,
        proposal=cfg.proposal,
        resampling=wcfg.smc.resampling,
        ess_threshold=float(wcfg.smc.ess_threshold),
        generator=gen,
    )
    prompt = world.tokenizer.decode(world.task.prompt_ids.tolist())
    w = res.normalized_weights
    order = torch.argsort(w, descending=True)
    print(f"prompt: {prompt!r}   task: {world.task.name}   T={world.task.output_len}   N={n}")
    if cond is not None:
        print(f"conditioning o: {world.tokenizer.decode(cond[0].tolist())!r}")
    print(f"{'weight':>8}  {'log w':>10}  {'log φ':>10}  text")
    lengths = res.lengths.tolist() if res.lengths is not None else None
    for i in order.tolist():
        row = res.tokens[i].tolist()
        text = world.tokenizer.decode(row if lengths is None else row[: lengths[i]])
        print(
            f"{float(w[i]):8.4f}  {float(res.log_w[i]):10.3f}  {float(res.log_phi[i]):10.3f}  {text}"
        )
    n_res = sum(info.resampled for info in res.infos)
    print(
        f"log Z-hat = {res.log_z_hat:.4f}   final ESS = {res.ess:.1f}/{n}   resampled at "
        f"{n_res}/{len(res.infos)} steps"
    )


def _conditioning(cfg: DictConfig, world: World, gen: torch.Generator) -> torch.Tensor | None:
    """Conditional tasks: o from ``cond=<text>`` (exactly task.cond_len tokens), else one o
    drawn from p₀ after the prompt and T tokens; broadcast to all particles."""
    from smclm.build import encode_prompt
    from smclm.errors import ConfigError

    task = world.task
    if not task.cond_len:
        return None
    n = int(cfg.n)
    if cfg.get("cond"):
        o = encode_prompt(world.tokenizer, str(cfg.cond))
        if o.numel() != task.cond_len:
            raise ConfigError(
                f"cond={cfg.cond!r} is {o.numel()} tokens but task.cond_len={task.cond_len}; "
                "give exactly that many tokens, or leave cond unset to draw o from p0"
            )
        return o.to(world.device)[None].expand(n, -1)
    _, o = task.sample_joint(world.model, 1, gen)
    return o.expand(n, -1)


def collect(cfg: DictConfig) -> None:
    validate(cfg, training=False)
    world = build_world(cfg)
    pool = exact_pool(cfg, world)
    assert pool is not None
    print(
        f"{pool.shape[0]} exact target samples of length {pool.shape[1]} are in "
        f"{cfg.exact_samples.cache_dir}"
    )
    stopping = world.task.stopping
    for row in pool[: min(5, pool.shape[0])]:
        ell = pool.shape[1] if stopping is None else int(stopping.lengths(row[None])[0])
        print("  " + world.tokenizer.decode(row[:ell].tolist()))
