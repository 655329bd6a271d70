"""LightningModule for mmr1: next-token loss on answer tokens + the MoE balancing losses (load-balancing, and
optionally sequence-wise and router z-loss, each weighted by its MoEConfig coef); after every optimizer step the
aux-loss-free routers' selection bias moves towards balance by the expert load the step observed. With
`distill`, the language-model loss also pulls towards a trained teacher's distributions (mmr1.distill).

AdamW with linear warmup then cosine decay, gradient clipping from the Trainer, and logs of loss, aux loss,
teacher-forced answer accuracy (per question type on validation) and tokens/s.
"""
from __future__ import annotations

import math
import time
from collections import defaultdict
from typing import Any, Optional

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
import torch
import torch.nn.functional as F

from mmr1.config import R1Config, config_to_dict
from mmr1.distill import DistillConfig, Teacher, check_student_reads_teacher_tokens, distillation_loss
from mmr1.model import EncoderConfig, MultimodalConfig, MultimodalR1
from mmr1.moe import MoEAux, MoEFeedForward
from mmr1.lora import LoRAConfig, apply_lora, parameter_counts, select_trainable
from mmr1.parallel.config import ParallelConfig
from mmr1.rng import rng_states, set_rng_states
from mmr1.telemetry import MOE_OUTPUTS_KEY
from mmr1.tokenizer import IGNORE_INDEX, R1Tokenizer


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """Labels aligned with logits: position t predicts token t+1. (B, L) -> (B, L)."""
    return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)


def answer_exact_match(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per example: True when every supervised token is the argmax (teacher forcing). (B,) bool."""
    supervised = targets != IGNORE_INDEX
    correct = (logits.argmax(-1) == targets) | ~supervised
    return correct.all(dim=1) & supervised.any(dim=1)


def summed_moe_loss(moe_aux: list[MoEAux], name: str, like: torch.Tensor) -> torch.Tensor:
    """One unweighted MoE loss (a field of MoEAux) summed over the MoE layers; 0 without MoE."""
    losses = [getattr(aux, name) for aux in moe_aux if getattr(aux, name) is not None]
    return torch.stack(losses).sum() if losses else like.new_zeros(())


class MMR1LightningModule(L.LightningModule):
    def __init__(self, tokenizer: str, backbone: Optional[R1Config] = None,
                 encoders: Optional[dict[str, EncoderConfig]] = None, init_from: Optional[str] = None,
                 init_from_hf: Optional[str] = None,
                 lr: float = 1e-3, encoder_lr_scale: float = 1.0, gate_lr_scale: float = 1.0,
                 weight_decay: float = 0.05,
                 betas: tuple[float, float] = (0.9, 0.95), warmup_steps: int = 50, min_lr_ratio: float = 0.1,
                 parallel: Optional[ParallelConfig] = None, lora: Optional[LoRAConfig] = None,
                 trainable: Optional[list[str]] = None, fused_adamw: Optional[bool] = None,
                 distill: Optional[DistillConfig] = None):
        """
        Args:
            tokenizer: a tokenizer.json (or a directory holding one); modality markers for the configured
                encoders are added, and the backbone's vocab_size follows the tokenizer.
            backbone: the R1 backbone config. encoders: {modality key: EncoderConfig}.
            init_from: an exported model directory to start from (its weights; the config above must match).
            init_from_hf: a local transformers checkpoint (Llama / Qwen2 / Mixtral / Qwen2-MoE) whose weights start
                the backbone; its architecture comes from the checkpoint, `backbone` adds cross-attention layers
                (and max_seq_len / dropout). The tokenizer must be the checkpoint's (see backbone_config_from_hf).
            lr: peak learning rate; encoders train at lr * encoder_lr_scale, and the cross-attention gates at
                lr * gate_lr_scale (a scalar gate starting at 0 opens slowly at the network's learning rate).
            parallel: data parallel (ddp | fsdp), tensor/expert-parallel sizes, activation checkpointing, FSDP
                mixed precision; applied in `configure_model` (see mmr1.parallel and docs/scaling.md).
            lora: train low-rank adapters (peft) instead of the backbone weights; see mmr1.lora.
            trainable: staged recipes -- regexes of the parameter names that train (e.g. ["^projectors\\.",
                "modality_embeddings", "\\.cross_attn\\."] for connector-only alignment); everything else is frozen.
            fused_adamw: torch's fused AdamW (one kernel for all parameters; on the CPU the demo's optimizer step
                takes 7 instead of 20 ms, benchmarks/optimizer.py). None: wherever it is exact -- 32-true and bf16-mixed,
                whose gradients need no unscaling, so clipping before the fused step is right (the module clips
                itself there: Lightning's plugin refuses for any fused optimizer) -- but not under fp16-mixed (its
                grad scaler) or FSDP, nor for sharded parameters; False: never.
            distill: also learn a trained model's next-token distributions (mmr1.distill): e.g. a speculative
                draft distilled from its target agrees with it more often.
        """
        super().__init__()
        self.tokenizer = R1Tokenizer.from_file(tokenizer)
        encoders = dict(encoders or {})
        self.distill = distill
        if self.reads_teacher_tokens:  # the prompts carry the teacher's modality markers
            self.tokenizer.add_modalities(check_student_reads_teacher_tokens(
                distill, MultimodalConfig(backbone=backbone or R1Config(), encoders=encoders)))
        else:
            self.tokenizer.add_modalities(list(encoders))
        if init_from_hf:
            from mmr1.hf_interop import backbone_config_from_hf
            backbone = backbone_config_from_hf(init_from_hf, backbone, self.tokenizer.vocab_size)
        else:
            backbone = backbone or R1Config()
            backbone.vocab_size = self.tokenizer.vocab_size
        self.model_config = MultimodalConfig(backbone=backbone, encoders=encoders)
        self.parallel_config = parallel or ParallelConfig()
        self.model = MultimodalR1(self.model_config)
        if init_from_hf:
            from mmr1.hf_interop import load_hf_weights
            load_hf_weights(self.model.backbone, init_from_hf)
        if init_from:
            self._load_init(init_from)
        if lora is not None:
            self.model = apply_lora(self.model, lora)
        if trainable is not None:
            select_trainable(self.model, trainable)
        # The init arguments as plain data: loggers show them, LightningCLI re-applies them for `--ckpt_path`,
        # and checkpoints stay loadable with torch.load(weights_only=True).
        self.save_hyperparameters({"tokenizer": str(tokenizer), "backbone": config_to_dict(backbone),
                                   "encoders": {k: config_to_dict(v) for k, v in encoders.items()},
                                   "init_from": init_from, "init_from_hf": init_from_hf, "lr": lr,
                                   "encoder_lr_scale": encoder_lr_scale, "gate_lr_scale": gate_lr_scale, "weight_decay": weight_decay,
                                   "betas": list(betas), "warmup_steps": warmup_steps, "min_lr_ratio": min_lr_ratio,
                                   "parallel": config_to_dict(self.parallel_config),
                                   "lora": config_to_dict(lora) if lora is not None else None,
                                   "trainable": list(trainable) if trainable is not None else None,
                                   "fused_adamw": fused_adamw,
                                   "distill": config_to_dict(distill) if distill is not None else None})
        if distill is not None and self.parallel_config.tensor_parallel_size > 1:
            raise ValueError("model.distill: not supported with tensor parallel (parallel.tensor_parallel_size > 1): "
                             "the teacher's logits are whole, the student's are split over ranks")
        # The teacher is loaded when fitting starts (setup) and kept outside the module tree: never optimized,
        # moved by Lightning, or saved with the student.
        object.__setattr__(self, "_teacher", None)
        moe = backbone.moe
        self.aux_loss_coef = moe.aux_loss_coef if moe else 0.0
        self.seq_aux_loss_coef = moe.seq_aux_loss_coef if moe else 0.0
        self.z_loss_coef = moe.z_loss_coef if moe else 0.0
        # Per MoE layer, the expert loads the router chose since the last optimizer step (aux-free balancing).
        self._expert_load: list[torch.Tensor] = []
        self._step_started = 0.0
        self._parallel_applied = False

    def _load_init(self, directory: str) -> None:
        from safetensors.torch import load_model

        from mmr1.model import WEIGHTS_NAME
        missing, unexpected = load_model(self.model, f"{directory}/{WEIGHTS_NAME}", strict=False)
        if unexpected:
            raise ValueError(f"init_from={directory}: weights {sorted(unexpected)[:5]} do not fit this model")

    @property
    def reads_teacher_tokens(self) -> bool:
        """distill.modality_tokens == "teacher": the student's cross-attention reads the teacher's modality tokens."""
        return self.distill is not None and self.distill.modality_tokens == "teacher"

    def processors(self):
        # A student that reads the teacher's modality tokens has no encoders: the batches carry the teacher's inputs.
        return self._placed_teacher().model.processors() if self.reads_teacher_tokens else self.model.processors()

    def setup(self, stage: str) -> None:
        if self.distill is not None and (stage == "fit" or self.reads_teacher_tokens):
            self._placed_teacher()

    def _placed_teacher(self) -> Teacher:
        """The frozen teacher (loaded on first use) placed like the student. A student that reads its modality
        tokens records which teacher made them (its config's token_source, carried into checkpoints and exports)."""
        if self._teacher is None:
            object.__setattr__(self, "_teacher", Teacher(self.distill, self.model, self.tokenizer))
            if self.reads_teacher_tokens:
                self.model.config.token_source = self._teacher.token_source()
        self._teacher.placed_like(self.model)
        return self._teacher

    def on_fit_start(self) -> None:
        if self.distill is not None:
            self._placed_teacher()
        counts = parameter_counts(self.model)
        rank_zero_info(f"mmr1: {counts['trainable']:,} of {counts['total']:,} parameters train "
                       f"({100 * counts['trainable'] / max(1, counts['total']):.2f} %)")
        for logger in self.loggers:
            logger.log_metrics({"params/trainable": counts["trainable"], "params/total": counts["total"]}, step=0)

    # ---- parallelism ------------------------------------------------------------------------------
    @property
    def distributed(self) -> bool:
        return self._trainer is not None and self.trainer.world_size > 1

    def configure_model(self) -> None:
        """Apply the `parallel:` config (TP, EP, activation checkpointing, FSDP). Lightning calls this once the
        processes and the device mesh exist, for every stage: applying twice is a no-op."""
        cfg = self.parallel_config
        if self._parallel_applied:
            return
        self._parallel_applied = True
        if cfg.needs_model_parallel_strategy:
            from lightning.pytorch.strategies import ModelParallelStrategy

            from mmr1.parallel import apply_parallelism
            if not isinstance(self.trainer.strategy, ModelParallelStrategy):
                raise ValueError(f"model.parallel asks for data_parallel={cfg.data_parallel!r}, tensor_parallel_size="
                                 f"{cfg.tensor_parallel_size}, expert_parallel_size={cfg.expert_parallel_size}, which "
                                 f"needs trainer.strategy mmr1.parallel.fsdp.FSDPStrategy (a ModelParallelStrategy), "
                                 f"not {type(self.trainer.strategy).__name__}; see configs/scale/fsdp.yaml")
            apply_parallelism(self.model, self.device_mesh, cfg)
        elif cfg.activation_checkpointing:
            from mmr1.parallel.fsdp import apply_activation_checkpointing
            apply_activation_checkpointing(self.model)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # Under tensor/expert parallel the parameters are DTensors on different meshes (TP: (dp, tp); experts:
        # their own mesh; the rest: dp), which torch's clip_grad_norm_ cannot stack; clip by the same global norm,
        # reduced mesh by mesh.
        cfg = self.parallel_config
        if gradient_clip_val and (cfg.expert_parallel_size > 1 or cfg.tensor_parallel_size > 1):
            if gradient_clip_algorithm not in (None, "norm"):
                raise ValueError(f"trainer.gradient_clip_algorithm={gradient_clip_algorithm!r}: with tensor/expert "
                                 f"parallel only 'norm' clipping is supported")
            from mmr1.parallel.clip import clip_grad_norm_
            clip_grad_norm_(self.parameters(), gradient_clip_val)
            return
        if gradient_clip_val and _bf16_autocast(self.trainer.precision_plugin) and optimizer.defaults.get("fused"):
            # Lightning's mixed-precision plugin refuses to clip for fused optimizers because they unscale fp16
            # gradients inside their step; bf16 autocast has no grad scaler, so the gradients are final here and
            # the base plugin's clipping is exact.
            from lightning.pytorch.plugins.precision import Precision
            Precision.clip_gradients(self.trainer.precision_plugin, optimizer, gradient_clip_val,
                                     gradient_clip_algorithm or "norm")
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # ---- steps ------------------------------------------------------------------------------------
    def _forward(self, batch: dict[str, Any], train: bool = False) -> dict[str, Any]:
        # With several ranks every rank runs every encoder (zero-contribution passes for absent modalities): the
        # same collectives in the same order whatever modalities each rank's batch carries.
        memory = None
        if self.reads_teacher_tokens:
            memory = self._placed_teacher().memory(batch, encode_absent=self.distributed)
            out = self.model.backbone(batch["input_ids"], attention_mask=batch["attention_mask"],
                                      cross_states=memory[0], cross_mask=memory[1])
        else:
            out = self.model(batch["input_ids"], batch["attention_mask"], batch.get("modalities"),
                             encode_absent=self.distributed)
        targets = shifted_targets(batch["labels"])
        lm_loss, lm_loss_value = self._lm_loss(out.logits, targets, global_tokens=train and self.distributed)
        seq_aux_loss = summed_moe_loss(out.moe_aux, "seq_aux_loss", lm_loss)
        z_loss = summed_moe_loss(out.moe_aux, "z_loss", lm_loss)
        loss = lm_loss + self.aux_loss_coef * out.aux_loss
        if self.seq_aux_loss_coef:  # only when enabled, so the default loss is exactly what it always was
            loss = loss + self.seq_aux_loss_coef * seq_aux_loss
        if self.z_loss_coef:
            loss = loss + self.z_loss_coef * z_loss
        distill_value = None
        if train and self._teacher is not None:
            distill_loss, distill_value = self._distill_loss(batch, out.logits, targets, self.distributed, memory)
            loss = loss + self.distill.weight * (distill_loss - lm_loss)  # (1 - w) * lm + w * distill
        return {"lm_loss": lm_loss_value, "aux_loss": out.aux_loss, "seq_aux_loss": seq_aux_loss, "z_loss": z_loss,
                "distill_loss": distill_value, "loss": loss, "correct": answer_exact_match(out.logits, targets),
                "moe_aux": out.moe_aux}

    def _lm_loss(self, logits: torch.Tensor, targets: torch.Tensor, global_tokens: bool
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token cross-entropy: (loss to backpropagate, its value over the whole global batch).

        One process: the mean over supervised tokens. Several (global_tokens): each rank's token sum divided by
        the global token count, times the world size (DDP/FSDP average gradients over ranks), so the gradient is
        exactly that of the mean over every rank's tokens -- what one process with the whole batch computes --
        even when ranks hold different numbers of supervised tokens.
        """
        flat_logits, flat_targets = logits.float().flatten(0, 1), targets.flatten()
        if not global_tokens:
            loss = F.cross_entropy(flat_logits, flat_targets, ignore_index=IGNORE_INDEX)
            return loss, loss
        token_sum = F.cross_entropy(flat_logits, flat_targets, ignore_index=IGNORE_INDEX, reduction="sum")
        return self._global_mean(token_sum, targets)

    def _global_mean(self, token_sum: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A rank's per-token loss sum -> (its share of the global mean to backpropagate, the global mean)."""
        count = (targets != IGNORE_INDEX).sum().to(token_sum.dtype)
        totals = self.trainer.strategy.reduce(torch.stack([token_sum.detach(), count]), reduce_op="sum")
        global_count = totals[1].clamp_min(1.0)
        return token_sum * self.trainer.world_size / global_count, totals[0] / global_count

    def _distill_loss(self, batch: dict[str, Any], logits: torch.Tensor, targets: torch.Tensor,
                      global_tokens: bool, memory: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The distillation term against the teacher's logits on the same batch, normalized like _lm_loss.
        memory: the teacher's modality tokens and mask when they are already computed."""
        teacher_logits = self._placed_teacher().logits(batch, memory)
        T = self.distill.temperature
        if not global_tokens:
            loss = distillation_loss(logits, teacher_logits, targets, T)
            return loss, loss
        return self._global_mean(distillation_loss(logits, teacher_logits, targets, T, reduction="sum"), targets)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_started = time.perf_counter()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        out = self._forward(batch, train=True)
        bs = batch["input_ids"].shape[0]
        self.log("train/loss", out["lm_loss"], prog_bar=True, batch_size=bs)
        self.log("train/aux_loss", out["aux_loss"], batch_size=bs)
        if self.model_config.backbone.moe is not None:
            self.log("train/seq_aux_loss", out["seq_aux_loss"], batch_size=bs)
            self.log("train/z_loss", out["z_loss"], batch_size=bs)
            self._accumulate_expert_load([aux.tokens_per_expert for aux in out["moe_aux"]])
        self.log("train/answer_acc", out["correct"].float().mean(), prog_bar=True, batch_size=bs)
        if out["distill_loss"] is not None:
            self.log("train/distill_loss", out["distill_loss"], batch_size=bs)
        # Routing records ride along to callbacks (mmr1.telemetry.ExpertTelemetry reads them).
        return {"loss": out["loss"], MOE_OUTPUTS_KEY: out["moe_aux"]}

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        elapsed = time.perf_counter() - self._step_started
        if elapsed > 0:
            self.log("train/tokens_per_s", batch["attention_mask"].sum().item() / elapsed, prog_bar=True)
            self.log("train/step_s", elapsed)  # forward, backward, clipping and optimizer step

    def _eval_step(self, batch: dict[str, Any], stage: str) -> None:
        out = self._forward(batch)
        bs = batch["input_ids"].shape[0]
        self.log(f"{stage}/loss", out["lm_loss"], prog_bar=True, batch_size=bs, sync_dist=True)
        self.log(f"{stage}/answer_acc", out["correct"].float().mean(), prog_bar=True, batch_size=bs, sync_dist=True)
        by_type = defaultdict(list)
        for qtype, ok in zip(batch.get("types") or [], out["correct"].tolist()):
            if qtype:
                by_type[qtype].append(float(ok))
        for qtype, values in by_type.items():
            self.log(f"{stage}/acc/{qtype}", sum(values) / len(values), batch_size=len(values), sync_dist=True)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, str]]:
        from mmr1.generation import generate

        keys = list(self.processors())
        prompts = [self.tokenizer.encode_prompt(q or "", [k for k in keys if k in batch.get("modalities", {})
                                                       and bool(batch["modalities"][k]["present"][i])])
                   for i, q in enumerate(batch["questions"])]
        if self.reads_teacher_tokens:
            cross_states, cross_mask = self._placed_teacher().memory(batch, encode_absent=self.distributed)
        else:
            cross_states, cross_mask = self.model.encode_batch(batch.get("modalities") or {}, len(prompts),
                                                               encode_absent=self.distributed)
        new_tokens = generate(self.model.backbone, prompts, cross_states=cross_states, cross_mask=cross_mask,
                              max_new_tokens=16, eos_id=self.tokenizer.eos_id, pad_id=self.tokenizer.pad_id)
        return [{"id": i, "question": q, "prediction": self.tokenizer.decode(t), "answer": a}
                for i, q, t, a in zip(batch["ids"], batch["questions"], new_tokens, batch["answers"])]

    # ---- optimisation ---------------------------------------------------------------------------------
    def configure_optimizers(self):
        hp = self.hparams
        groups: dict[tuple[str, bool], list] = defaultdict(list)
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            kind = "gate" if name.endswith(".gate") else "encoder" if name.startswith("encoders.") else "base"
            no_decay = param.ndim < 2 or "embedding" in name or kind == "gate"
            groups[(kind, no_decay)].append(param)
        scale = {"gate": hp.gate_lr_scale, "encoder": hp.encoder_lr_scale, "base": 1.0}
        param_groups = [{"params": params, "weight_decay": 0.0 if no_decay else hp.weight_decay,
                         "lr": hp.lr * scale[kind]} for (kind, no_decay), params in groups.items()]
        fused = {"fused": True} if self._fused_adamw_allowed() else {}
        optimizer = torch.optim.AdamW(param_groups, lr=hp.lr, betas=tuple(hp.betas), **fused)
        rank_zero_info(f"mmr1: AdamW {'fused (one kernel for all parameters)' if fused else 'unfused'}")
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = min(hp.warmup_steps, total // 2)

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return hp.min_lr_ratio + (1 - hp.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _fused_adamw_allowed(self) -> bool:
        choice = self.hparams.get("fused_adamw")
        if choice is False:
            return False
        from lightning.pytorch.plugins.precision import DoublePrecision, HalfPrecision, Precision
        from torch.distributed.tensor import DTensor

        plugin = type(self.trainer.precision_plugin)
        params = [p for p in self.model.parameters() if p.requires_grad]
        why = (f"the {plugin.__name__} plugin refuses gradient clipping with it"
               if plugin not in (Precision, HalfPrecision, DoublePrecision)
               and not _bf16_autocast(self.trainer.precision_plugin) else
               "parameters are sharded (DTensor)" if any(isinstance(p, DTensor) for p in params) else
               "a parameter is not on a CPU or CUDA device" if any(p.device.type not in ("cpu", "cuda")
                                                                   for p in params) else None)
        if why is not None and choice:
            raise ValueError(f"fused_adamw: true cannot be honoured: {why}; leave it unset (auto) or set false")
        return why is None

    # ---- aux-loss-free balancing: the routers' selection bias follows the load each optimizer step saw ----
    def _accumulate_expert_load(self, loads: list[torch.Tensor]) -> None:
        """Sum the per-layer expert loads of the micro-batches that make up one optimizer step."""
        if not self._expert_load:
            self._expert_load = [load.detach().clone() for load in loads]
        else:
            self._expert_load = [total + load.detach() for total, load in zip(self._expert_load, loads)]

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.update_expert_biases()

    def update_expert_biases(self) -> None:
        """Nudge each aux-free router's bias by the load observed since the last optimizer step (summed over
        data-parallel ranks, so every rank applies the same update), then start counting afresh."""
        loads, self._expert_load = self._expert_load, []
        routers = [block.ffn.router for block in self.model.backbone.layers if isinstance(block.ffn, MoEFeedForward)]
        for router, load in zip(routers, loads):
            if router.cfg.aux_free_bias:
                router.update_bias(self.trainer.strategy.reduce(load.float(), reduce_op="sum"))

    # ---- checkpoints carry what export needs, as plain data ---------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["mmr1"] = {"config": self.model.export_config().to_dict(),
                              "tokenizer": self.tokenizer.tok.to_str()}
        # Every rank's RNG states (dropout draws, ...), so a resumed run continues each rank's random streams.
        states = [rng_states()]
        if self.distributed:
            states = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(states, rng_states())
        checkpoint["mmr1_rng"] = states

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("mmr1_rng")
        rank = self.trainer.global_rank if self._trainer is not None else 0
        if states and len(states) == (self.trainer.world_size if self._trainer is not None else 1):
            set_rng_states(states[rank])


def _bf16_autocast(plugin: Any) -> bool:
    """Whether a Lightning precision plugin is bf16 autocast without a grad scaler (`precision: bf16-mixed`)."""
    from lightning.pytorch.plugins.precision import MixedPrecision
    return type(plugin) is MixedPrecision and plugin.scaler is None
