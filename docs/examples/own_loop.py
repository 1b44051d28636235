"""Distil a DeiT student from a stillroom cache in a plain PyTorch loop that resumes exactly (docs/api.md).

python docs/examples/own_loop.py --shards 'DIR/train-{000000..000009}.tar' --cache CACHE --steps 100 --out runs/x
A rerun with the same --out continues from OUT/last.pth; under torchrun each process trains its share (DDP).
"""

import argparse
import os

import timm
import torch
import torch.distributed as dist

from pipeline import DistillationSource, Normalized

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--shards", required=True)
parser.add_argument("--cache", required=True, action="append", help="a teacher's cache (repeat for several)")
parser.add_argument("--steps", type=int, default=100)
parser.add_argument("--out", help="checkpoint folder: a rerun with it continues where the last one stopped")
parser.add_argument("--model", default="deit_tiny_distilled_patch16_224")
parser.add_argument("--batch-size", type=int, default=16)
parser.add_argument("--workers", type=int, default=2)
args = parser.parse_args()
if "WORLD_SIZE" in os.environ:  # torchrun: join the group first; the source takes its rank and world from it
    dist.init_process_group()
device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")

source = DistillationSource(args.shards, args.cache, batch_size=args.batch_size, workers=args.workers)
criterion = source.loss(alpha=0.5)  # DeiT's hard distillation: class head <- labels, distillation head <- teacher
torch.manual_seed(0)
net = timm.create_model(args.model, num_classes=source.num_classes, img_size=source.img_size)
net.set_distilled_training(True)  # a distilled DeiT returns both heads' logits while training
model = Normalized(net).to(device)  # the cache's compact pixels -> the input this student was made for
optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.05)
path, step = os.path.join(args.out or ".", "last.pth"), 0
if args.out and os.path.exists(path):
    state = torch.load(path, map_location=device, weights_only=True)
    net.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    source.load_state_dict(state["data"])  # its next batch is the one after the saved step
    step = state["step"]
if dist.is_initialized():
    model = torch.nn.parallel.DistributedDataParallel(model)
model.train()
while step < args.steps:
    for batch in source:  # the epoch from where the source stands; after its last batch, the next epoch
        batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        torch.manual_seed(batch["noise_seed"])  # drop path draws the same noise after a resume
        loss = criterion(model(batch["pixels"]), batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        print(f"step {step} loss {loss.item():.6f}", flush=True)
        step += 1
        if args.out and source.rank == 0:  # the data's state is the same on every rank
            os.makedirs(args.out, exist_ok=True)
            state = {"model": net.state_dict(), "optimizer": optimizer.state_dict(), "data": source.state_dict()}
            torch.save({**state, "step": step}, path + ".tmp")
            os.replace(path + ".tmp", path)  # a kill mid-save leaves the last checkpoint whole
        if step == args.steps:
            break
