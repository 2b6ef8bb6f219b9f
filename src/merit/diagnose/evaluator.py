"""One model whose weights are overwritten in place for every point diagnose evaluates.

Loaded once (from the merge, in the run's ``model.dtype``, as the eval stage loads a checkpoint); each
point's weights are copied in tensor by tensor from lazily opened checkpoints, so memory is one model
plus a few tensors whatever K is. Its loss is results.json's: the mean over sources of each source's
token-mean assistant loss (:func:`merit.evaluate.runner.assistant_loss`) on the examples the eval stage
reads (:func:`merit.pipeline.eval_examples`) with the run's eval settings.
"""

from __future__ import annotations

from collections.abc import Callable

from merit.diagnose.inputs import LazyCheckpoint, RunFolder
from merit.errors import MeritError


class Evaluator:
    """One model, loaded once from the merge, whose weights are overwritten in place for every point."""

    def __init__(self, folder: RunFolder, max_per_source: int | None = None, calibration_size: int | None = None,
                 device: str | None = None):
        import torch

        from merit.evaluate.runner import load_eval_model
        from merit.models.loading import load_tokenizer
        from merit.pipeline import eval_examples, eval_settings

        cfg = folder.cfg
        self.settings = eval_settings(cfg)
        self.heldout, _ = eval_examples(cfg, folder.mixture, "eval", max_per_source)
        # A fixed sample of training data, as many examples per source as held out (the gap's other side).
        self.train, _ = eval_examples(cfg, folder.mixture, "train", max_per_source)
        self.calibration = {n: ex[: calibration_size] for n, ex in self.heldout.items()}
        self.tokenizer = load_tokenizer(folder.main.merged)
        self.model = load_eval_model(folder.main.merged, cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code)
        if device is not None:  # the eval stage scores where the model loads (the CPU): results.json's device
            self.model.to(device)
        self.model.eval()
        self.seed = cfg.seed
        self.state = self.model.state_dict()  # name -> tensor sharing the parameter's storage
        names = LazyCheckpoint(folder.main.merged).entries
        self.names = [n for n in names if n in self.state]
        if not self.names:
            raise MeritError(f"{folder.main.merged}: no tensor name of the checkpoint matches the model's parameters")
        self.floating = [n for n in self.names if self.state[n].is_floating_point()]
        self._torch = torch

    def set_weights(self, tensor_of: Callable[[str], object]) -> None:
        with self._torch.no_grad():
            for name in self.names:
                self.state[name].copy_(tensor_of(name))

    def load(self, checkpoint: LazyCheckpoint) -> None:
        self.set_weights(checkpoint.__getitem__)

    def loss(self, examples: dict[str, list[dict]] | None = None) -> float:
        """results.json's loss: mean over sources of each source's token-mean assistant loss."""
        from merit.evaluate.runner import assistant_loss

        examples = self.heldout if examples is None else examples
        self._torch.manual_seed(self.seed)  # as stage_eval (the loss is deterministic; kept for parity)
        per_source = []
        for items in examples.values():
            total, count = assistant_loss(self.model, self.tokenizer, items, self.settings)
            per_source.append(total / max(count, 1))
        return sum(per_source) / len(per_source)

    def curvature(self, vector: dict[str, object]) -> float:
        """vᵀ H v at the model's current weights, H the Hessian of the same macro loss on the calibration
        examples. Summed batch by batch (H is linear in the loss): each batch's H_b·v is dotted with v and
        dropped, so memory is v, one batch's graph and one H_b·v, never an accumulated H·v."""
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel

        from merit.conflict.estimate import pad_batch, summed_token_loss
        from merit.data.chat import tokenize_conversation
        from merit.diagnose.landscape import hessian_vector_product, quadratic_form

        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        vec = [vector[n].to(device=p.device, dtype=p.dtype) if n in vector else torch.zeros_like(p) for n, p in named]
        s = self.settings
        sources = list(self.calibration.values())
        total = 0.0
        # The math kernel: fused attention kernels (flash, memory-efficient) have no double backward.
        with sdpa_kernel(SDPBackend.MATH):
            for items in sources:
                toks = [tokenize_conversation(self.tokenizer, ex["messages"], s.max_length) for ex in items]
                toks = sorted((t for t in toks if t.loss_tokens > 0), key=lambda t: len(t.input_ids))
                scale = 1.0 / (max(sum(t.loss_tokens for t in toks), 1) * len(sources))  # token mean, then source mean
                for i in range(0, len(toks), s.batch_size):
                    batch = pad_batch(toks[i : i + s.batch_size], self.tokenizer.pad_token_id)
                    batch = {k: v.to(params[0].device) for k, v in batch.items()}
                    hv = hessian_vector_product(lambda: summed_token_loss(self.model, batch)[0] * scale, params, vec)
                    total += quadratic_form(vec, hv)
                    del hv
        self.model.zero_grad(set_to_none=True)
        return total
