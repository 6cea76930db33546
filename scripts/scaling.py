#!/usr/bin/env python
"""Expected throughput and communication per update at 1, 8, 64 GPUs (docs/scaling.md).

    python scripts/scaling.py --samples-per-s 1150 --grad-mb 418 --effective-batch 1024 --micro 32

Inputs are measured single-device figures (scripts/bench.py: samples/s of the trainer's loop, and
the gradient megabytes all-reduced per update from its communication table). The model:
  compute per update  = effective batch / world / samples_per_s       (each device does its share)
  gradient exchange   = ONE ring all-reduce per update (measured: 1 for any N), each device sends
                        and receives 2 (W-1)/W x gradient bytes, at the slowest link's bandwidth
  overlap             = DDP overlaps the exchange with the backward (~2/3 of a micro-batch's compute)
                        of the window's last micro-batch only, so at most 2/(3N) of the compute hides it
Syncing every micro-batch would cost N exchanges per update instead of one.
"""

from __future__ import annotations

import argparse
import json


def per_update(world: int, args) -> dict:
    per_device = args.effective_batch / world
    n = max(1, round(per_device / args.micro))
    compute_s = per_device / args.samples_per_s
    link_gbs = args.intra_gbs if world <= args.gpus_per_node else args.inter_gbs
    sent_mb = 0.0 if world == 1 else 2 * (world - 1) / world * args.grad_mb
    comm_s = sent_mb / 1024 / link_gbs
    hidden_s = min(comm_s, 2 / 3 * compute_s / n)  # overlapped with the last micro-batch's backward
    update_s = compute_s + comm_s - hidden_s
    return {"GPUs": world, "N (micro x N x W)": f"{n} ({args.micro}x{n}x{world})",
            "compute s/update": compute_s, "MB sent per GPU per update": sent_mb, "link GB/s": link_gbs,
            "exchange s/update": comm_s, "s/update": update_s, "samples/s": args.effective_batch / update_s,
            "scaling efficiency": args.effective_batch / update_s / (world * args.samples_per_s),
            "exchange s/update if synced every micro-batch": comm_s * n}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples-per-s", type=float, required=True, help="one device, this trainer's loop (measured)")
    p.add_argument("--grad-mb", type=float, required=True, help="gradient MB all-reduced per update (measured)")
    p.add_argument("--effective-batch", type=int, default=1024)
    p.add_argument("--micro", type=int, default=32, help="micro-batch per device")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--intra-gbs", type=float, default=300.0, help="all-reduce bus bandwidth inside a node, GB/s")
    p.add_argument("--inter-gbs", type=float, default=40.0, help="all-reduce bus bandwidth across nodes, GB/s")
    p.add_argument("--worlds", default="1,8,64")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    rows = [per_update(int(w), args) for w in args.worlds.split(",")]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    from tabulate import tabulate

    print(tabulate(rows, headers="keys", tablefmt="github", floatfmt=".3g"))


if __name__ == "__main__":
    main()
