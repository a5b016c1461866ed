"""An example twist learner: CTL's contrastive loss plus a weighted DPG loss.

A learner is any class whose ``loss(batch) -> (loss, metrics)`` returns a scalar tensor with
gradients through the twist and a dict of floats; smclm steps the optimiser. This one combines two
built-in losses in a few lines; configs/method/ctl_dpg.yaml names it by ``_target_``.
"""

from __future__ import annotations

from smclm.methods import build_method


class CTLPlusDPG:
    """loss = CTL + dpg_weight · DPG, each on its own samples of the update."""

    name = "ctl_dpg"

    def __init__(self, dpg_weight: float = 0.5, positives: str = "sis") -> None:
        self.ctl = build_method("ctl", positives=positives)
        self.dpg = build_method("dpg", positives=positives)
        self.dpg_weight = float(dpg_weight)
        self.needs_exact = self.ctl.needs_exact  # the trainer provides exact samples when True

    def loss(self, batch):
        loss_ctl, metrics = self.ctl.loss(batch)
        loss_dpg, _ = self.dpg.loss(batch)
        loss = loss_ctl + self.dpg_weight * loss_dpg
        metrics = {
            **metrics,
            "train/loss": float(loss.detach()),
            "train/loss_ctl": float(loss_ctl.detach()),
            "train/loss_dpg": float(loss_dpg.detach()),
        }
        return loss, metrics
