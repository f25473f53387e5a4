"""torch.distributed in a few visible functions: setup under torchrun, rank-0 work, gradient averaging, FSDP, shutdown.

Launched by `torchrun --nproc_per_node N script.py ...`, a script calls setup() and gets (rank, nproc); launched
plainly it gets (0, 1) and every function here is a no-op, so single-process code paths stay untouched.

Two kinds of data parallelism. LoRA: every rank holds the whole model and average_gradients() all-reduces the few
trainable gradients after backward. Full fine-tuning: shard_model() applies FSDP2 (`fully_shard`), so each rank
holds 1/N of the weights, gradients and AdamW moments; the weights are all-gathered per layer in forward and
backward, and the gradients are reduce-scattered (averaged) during backward.
"""

import datetime
import gc
import os
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint.state_dict as dcp
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method


def setup():
    """(rank, number of processes); joins the process group (gloo on CPU, nccl on CUDA) when torchrun started us."""
    nproc = int(os.environ.get("WORLD_SIZE", "1"))
    if nproc == 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        # Generation on one rank can take long before the next barrier: a generous timeout, not the 30 min default.
        dist.init_process_group(backend, timeout=datetime.timedelta(hours=6))
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), dist.get_world_size()


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def say(msg):
    """Print on rank 0 only (every rank computes the same global statistics)."""
    if rank() == 0:
        print(msg, flush=True)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def average_gradients(params):
    """Data parallelism made explicit: after backward, every rank holds the mean of all ranks' gradients.

    With equal shards of the global batch this equals the single-process gradient of the whole batch.
    """
    if not dist.is_initialized():
        return
    nproc = dist.get_world_size()
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad /= nproc


def shard_model(model, mixed_precision):
    """FSDP2 on a Llava, in place: one shard group per vision and decoder layer, then the root group (the rest).

    A group's weights are all-gathered just before its forward (and again in backward) and freed after, so a rank
    holds its 1/N of every weight plus about one layer in full. The root group holds the embeddings, norms,
    projector and lm_head (tied weights must share a group). Training calls encode_images and hidden_states, not
    forward, so both are registered to run FSDP's hooks. Backward reaches the root twice (hidden_states' input,
    then encode_images' output): FSDP reduce-scatters the root's gradients present at the first, gathers the root
    again for the projector's backward and reduce-scatters the rest at the end (tests/test_fsdp.py checks the sum).
    mixed_precision (CUDA): bf16 compute weights, fp32 gradient reduction, fp32 sharded master weights; off (CPU):
    fp32 throughout. Build the optimizer afterwards, over the new (DTensor) parameters.
    """
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision else (
        MixedPrecisionPolicy())
    for layer in [*model.model.vision_tower.encoder.layers, *model.model.language_model.layers]:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    for method in ("encode_images", "hidden_states"):
        register_fsdp_forward_method(model, method)
    # nn.Linear on (B, N, D) returns a view, so FSDP warns about in-place ops on encode_images' output (the
    # projector's); nothing modifies it in place.
    warnings.filterwarnings("ignore", r"FSDP2-wrapped module \(FSDPLlava\) returned a view tensor")
    return model


FULL = dcp.StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered to whole tensors on rank 0's CPU


def trainable_state(model, opt):
    """(trainable weights by name, AdamW state by parameter index) for a checkpoint; the same format with or without
    FSDP, so either can resume the other. Under FSDP every rank must call this; rank 0 gets whole CPU tensors."""
    if not isinstance(model, FSDPModule):
        return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}, opt.state_dict()["state"]
    index = {n: i for i, (n, p) in enumerate((n, p) for n, p in model.named_parameters() if p.requires_grad)}
    weights = dcp.get_model_state_dict(model, options=FULL)
    moments = dcp.get_optimizer_state_dict(model, opt, options=FULL).get("state", {})
    if dist.get_rank() != 0:  # cpu_offload gathers onto rank 0 only; the others get empty dicts
        return {}, {}
    return {n: weights[n] for n in index}, {index[n]: st for n, st in moments.items()}


def load_trainable_state(model, opt, weights, moments):
    """Inverse of trainable_state; every rank passes the whole tensors and keeps its shard under FSDP."""
    if not isinstance(model, FSDPModule):
        params = dict(model.named_parameters())
        for n, v in weights.items():
            params[n].data.copy_(v)
        opt.load_state_dict(opt.state_dict() | {"state": moments})
        return
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    dcp.set_model_state_dict(model, weights, options=dcp.StateDictOptions(full_state_dict=True, strict=False))
    groups = [g | {"params": [names[i] for i in g["params"]]} for g in opt.state_dict()["param_groups"]]
    osd = {"state": {names[i]: st for i, st in moments.items()}, "param_groups": groups}  # keyed by name
    dcp.set_optimizer_state_dict(model, opt, osd, options=dcp.StateDictOptions(full_state_dict=True))


def gather_model(model):
    """A sharded Llava's full weights as a plain fp32 Llava on rank 0's CPU (None on other ranks); all ranks call."""
    from sena.model import Llava

    state = dcp.get_model_state_dict(model, options=FULL)
    if dist.get_rank() != 0:
        return None
    with torch.device("meta"):
        plain = Llava(model.config)
    plain.load_state_dict(state, assign=True)
    if model.config.text.tie_word_embeddings:
        plain.lm_head.weight = plain.model.language_model.embed_tokens.weight
    return plain.float()


def average(values):
    """Mean over ranks of a dict of floats (for logging global-batch statistics)."""
    if not dist.is_initialized():
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return dict(zip(keys, (t / dist.get_world_size()).tolist()))


def shutdown():
    """Leave the process group cleanly. Callers drop their models and optimizers first; collecting garbage before
    destroying the group avoids gloo's "terminate called without an active exception" abort at exit
    (measured: 0 failures in 50 two-process runs)."""
    if not dist.is_initialized():
        return
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def all_ranks(flag):
    """True when `flag` holds on every rank (ranks must agree before skipping a step together)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1 if flag else 0])
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def size():
    return dist.get_world_size() if dist.is_initialized() else 1
