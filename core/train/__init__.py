"""SAE training: the config (`config`), the stream over an activation source (`loop`), one
SAE's steps (`run`), checkpoints (`checkpoints`), and the activation sources themselves —
cached activation folders or the model run on the fly, with the held-out slice (`sources`,
imported on its own: it needs the model side of core).

The recipe follows Gao et al. 2024, Anthropic's April 2024 update, Rajamanoharan et al. 2024
and EleutherAI's sparsify, with the lessons recorded in DESIGN.md: activations scaled so
E‖x‖ = √d_in (the scale folded back into the returned SAE); b_dec at the geometric median of a
sample; unit-norm decoder rows; dead latents tracked by tokens since they last fired;
schedule-free sign-SGD (or Adam with lr warmup and final decay); fp32 master weights, the
encoder's matmul in bf16 where bf16 is native and faster (`TrainConfig.autocast`). The types'
losses live in `core/sae/`.
"""

from core.train.checkpoints import CheckpointConfig, checkpoints
from core.train.config import RunSpec, TrainConfig, TrainResult
from core.train.loop import Progress, Source, replayable, train_sae, train_saes
from core.train.run import default_lr, lr_factor

__all__ = ["CheckpointConfig", "checkpoints", "RunSpec", "TrainConfig", "TrainResult", "Progress", "Source",
           "replayable", "train_sae", "train_saes", "default_lr", "lr_factor"]
