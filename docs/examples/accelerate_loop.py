"""The loop of own_loop.py under Hugging Face Accelerate (docs/api.md): the source and the loss are the same,
Accelerate places the model, wraps it for data parallelism and saves and restores the whole state.

accelerate launch docs/examples/accelerate_loop.py --shards 'DIR/train-{000000..000009}.tar' --cache C --out runs/x
(or plain python for one process). A rerun with the same --out continues from its saved state, exactly.
"""

import argparse
import os

import timm
import torch
from accelerate import Accelerator

from pipeline import DistillationSource, Normalized

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--shards", required=True)
parser.add_argument("--cache", required=True, action="append", help="a teacher's cache (repeat for several)")
parser.add_argument("--steps", type=int, default=100)
parser.add_argument("--out", help="state folder: a rerun with it continues where the last one stopped")
parser.add_argument("--model", default="deit_tiny_distilled_patch16_224")
parser.add_argument("--batch-size", type=int, default=16)
parser.add_argument("--workers", type=int, default=2)
args = parser.parse_args()


class Steps:
    """The loop's step count, saved and restored with the rest (Accelerate keeps any object with a state_dict)."""

    done = 0

    def state_dict(self) -> dict:
        return {"done": self.done}

    def load_state_dict(self, state: dict) -> None:
        self.done = state["done"]


accelerator = Accelerator()  # under `accelerate launch` it joins torch.distributed: the source takes rank and world
source = DistillationSource(args.shards, args.cache, batch_size=args.batch_size, workers=args.workers)
criterion = source.loss(alpha=0.5)  # DeiT's hard distillation
torch.manual_seed(0)
net = timm.create_model(args.model, num_classes=source.num_classes, img_size=source.img_size)
net.set_distilled_training(True)
optimizer = torch.optim.AdamW(net.parameters(), lr=5e-4, weight_decay=0.05)
# Not the source: it is already this rank's share of the epoch (Accelerate would shard it again).
model, optimizer = accelerator.prepare(Normalized(net), optimizer)
steps = Steps()
accelerator.register_for_checkpointing(source, steps)  # their state_dict()s travel in save_state/load_state
if args.out and os.path.isdir(args.out):
    accelerator.load_state(args.out)
model.train()
while steps.done < args.steps:
    for batch in source:  # the epoch from where the source stands; after its last batch, the next epoch
        batch = {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        torch.manual_seed(batch["noise_seed"])  # drop path draws the same noise after a resume
        loss = criterion(model(batch["pixels"]), batch)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        accelerator.print(f"step {steps.done} loss {loss.item():.6f}", flush=True)
        steps.done += 1
        if args.out:
            accelerator.save_state(args.out)
        if steps.done == args.steps:
            break
