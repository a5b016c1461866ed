"""Sequence lengths against the model's context, checked once before any sampling.

Every sequence a run builds is the prompt (P tokens), T output tokens and, on conditional tasks,
the c tokens o after them: the sampler draws P + T tokens, joint sampling and the infilling
potential log p₀(o | prompt, s) run over P + T + c. A model with learned positions (GPT-2's
``n_positions``, GPT-Neo's ``max_position_embeddings``) fails deep inside its position embedding
once that is longer than its table, so it is refused here with the numbers and the fixes.
"""

from __future__ import annotations

from typing import Any

from smclm.errors import ConfigError

# config attributes that hold a causal LM's number of positions, in the order they are read
POSITION_KEYS = ("n_positions", "max_position_embeddings", "n_ctx")


def max_positions(model: Any) -> int | None:
    """The model's maximum sequence length from its config, or None when it states none."""
    config = getattr(model, "config", None)
    for key in POSITION_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_context(model: Any, task: Any, model_name: str = "the model") -> None:
    """Refuse (ConfigError, one line) a task whose prompt + T (+ c) exceeds the model's positions.

    ``task`` has ``prompt_ids`` [P], ``output_len`` (T) and ``cond_len`` (c, 0 if unconditional).
    """
    limit = max_positions(model)
    p_len, t_len, c_len = int(task.prompt_ids.numel()), int(task.output_len), int(task.cond_len)
    need = p_len + t_len + c_len
    if limit is None or need <= limit:
        return
    parts = f"prompt {p_len} + task.output_len {t_len}"
    if c_len:
        parts += f" + task.cond_len {c_len}"
    room = limit - p_len - c_len
    fix = f"set task.output_len={room} or less, " if room > 0 else ""
    raise ConfigError(
        f"{parts} = {need} tokens is longer than model.name={model_name}'s context of {limit} "
        f"positions; {fix}use a shorter task.prompt, or a model with a longer context"
    )
