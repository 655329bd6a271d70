"""Lightning data module over JSONL manifests.

Its init args are plain values so `LightningCLI` / jsonargparse can build it from YAML. Processors and the
tokenizer belong to the model: pass them with `attach()`, or leave it to `setup()`, which takes them from
`trainer.lightning_module.processors()` and `.tokenizer`. `setup()` reads and validates every manifest in the
main process, so bad inputs fail (or are skipped and reported in `skip_report`) before any worker starts.

The training order comes from `ResumableSampler` (seed, epoch, global batch): data-parallel ranks split each
global batch, and `state_dict()` records how far into the epoch training got, so a run resumed from a mid-epoch
checkpoint (`--ckpt_path last`) continues with exactly the batch the interrupted run would have taken next.
"""
from __future__ import annotations

import warnings
from typing import Any, Mapping

import lightning
import torch
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch.utils.data import DataLoader

from data_pipelines.collate import MultimodalCollator
from data_pipelines.dataset import MultimodalDataset
from data_pipelines.manifest import read_manifest
from data_pipelines.sampler import ResumableSampler

SPLITS = ("train", "val", "test", "predict")
STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}


class MultimodalDataModule(lightning.LightningDataModule):
    def __init__(self, train_manifest: str, val_manifest: str | None = None, test_manifest: str | None = None,
                 predict_manifest: str | None = None, batch_size: int = 16, num_workers: int = 0,
                 max_length: int = 256, skip_bad_records: bool = False, cache: bool = True, seed: int = 0,
                 shuffle: bool = True):
        super().__init__()
        self.save_hyperparameters()
        self.manifests = {"train": train_manifest, "val": val_manifest, "test": test_manifest,
                          "predict": predict_manifest}
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.max_length = max_length
        self.skip_bad_records = skip_bad_records
        self.cache = cache
        self.seed = seed
        self.shuffle = shuffle  # False: train in manifest order (curricula, reproducing a given batch layout)
        self.processors: dict[str, Any] | None = None
        self.tokenizer: Any = None
        self.datasets: dict[str, MultimodalDataset] = {}
        self.skip_report: dict[str, dict] = {}  # split -> {"records", "skipped", "errors"}
        self._resume: dict | None = None  # the training position of the checkpoint being resumed
        self._train_sampler: ResumableSampler | None = None

    def attach(self, processors: Mapping[str, Any], tokenizer: Any) -> "MultimodalDataModule":
        """Use these (ordered) processors and this tokenizer instead of the trainer's model's."""
        self.processors = dict(processors)
        self.tokenizer = tokenizer
        return self

    def setup(self, stage: str | None = None) -> None:
        if self.processors is None or self.tokenizer is None:
            self._attach_from_trainer()
        splits = STAGE_SPLITS[stage] if stage in STAGE_SPLITS else SPLITS
        for split in splits:
            if split in self.datasets:  # fit then test: each split is read and validated once
                continue
            path = self.manifests[split]
            if path is None:
                if split == "train" or stage in ("validate", "test", "predict"):
                    raise ValueError(f"stage {stage!r} needs a {split} manifest; set {split}_manifest")
                continue
            self.datasets[split] = self._build(split, path)

    def _attach_from_trainer(self) -> None:
        model = self.trainer.lightning_module if self.trainer is not None else None
        if model is None or not hasattr(model, "processors") or not hasattr(model, "tokenizer"):
            raise RuntimeError("MultimodalDataModule has no processors/tokenizer: call attach(processors, tokenizer) "
                               "or run it in a Trainer whose model has processors() and tokenizer")
        self.attach(model.processors(), model.tokenizer)

    def _build(self, split: str, path: str) -> MultimodalDataset:
        records = read_manifest(path, list(self.processors), require_answer=split != "predict")
        dataset = MultimodalDataset(records, self.processors, self.tokenizer, manifest=path,
                                    max_length=self.max_length, cache=self.cache)
        self.skip_report[split] = dataset.validate(skip_bad=self.skip_bad_records)
        if len(dataset) == 0:
            raise ValueError(f"every record of {path} was skipped as bad; first error: "
                             f"{self.skip_report[split]['errors'][0]}")
        return dataset

    # ---- loaders --------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        world, rank = self._data_parallel_rank()
        sampler = ResumableSampler(self._dataset("train"), self.batch_size, world, rank, shuffle=self.shuffle,
                                   seed=self.seed)
        self._train_sampler = sampler
        self._apply_resume()
        # The loader's own generator draws the worker base seed, so iterating it leaves the global RNG alone.
        return self._loader("train", sampler=sampler, generator=torch.Generator().manual_seed(self.seed))

    def val_dataloader(self) -> DataLoader | list:
        # No val manifest means no validation; Lightning treats an empty list as "nothing to validate on".
        return self._loader("val") if self.manifests["val"] is not None else []

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict")

    def _dataset(self, split: str) -> MultimodalDataset:
        if split not in self.datasets:
            raise RuntimeError(f"no {split} dataset: set {split}_manifest and call setup() first")
        return self.datasets[split]

    def _data_parallel_rank(self) -> tuple[int, int]:
        """(replicas, rank) of data parallelism: the trainer's (ranks of one tensor-parallel group share data)."""
        trainer = self.trainer
        if trainer is None:
            return 1, 0
        kwargs = trainer.strategy.distributed_sampler_kwargs if trainer.world_size > 1 else None
        return (kwargs["num_replicas"], kwargs["rank"]) if kwargs else (1, 0)

    # ---- exact resume: where in the data the checkpoint was taken ---------------------------------
    def state_dict(self) -> dict[str, Any]:
        trainer = self.trainer
        if trainer is None or not trainer.training:
            return {}
        world, _ = self._data_parallel_rank()
        batches = trainer.fit_loop.epoch_loop.batch_progress.current.ready  # batches trained in this epoch
        return {"seed": self.seed, "epoch": trainer.current_epoch, "samples": batches * self.batch_size * world}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if state["seed"] != self.seed:
            raise ValueError(f"data.seed={self.seed} but the checkpoint was trained with data.seed={state['seed']}; "
                             "resuming would change the data order")
        self._resume = dict(state)
        # Lightning warns that a mid-epoch resume is unreliable unless the loader itself has a state_dict; this
        # DataModule restores the position through its sampler (exact: tests/test_resume.py), so here it is false.
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch",
                                category=PossibleUserWarning)
        # Strategies that restore after setup (FSDP) have built the train loader already (for the LR schedule's
        # step count): hand the position to its sampler, which reads it when the epoch's iteration starts.
        self._apply_resume()

    def _apply_resume(self) -> None:
        if self._resume is not None and self._train_sampler is not None:
            self._train_sampler.resume(self._resume["epoch"], self._resumed_batches(self._train_sampler.num_replicas))

    def _resumed_batches(self, world: int) -> int:
        samples, global_batch = self._resume["samples"], self.batch_size * world
        if samples % global_batch:
            raise ValueError(f"the checkpoint was taken after {samples} samples of epoch {self._resume['epoch']}, "
                             f"not a whole number of global batches of {global_batch} (data.batch_size * "
                             "data-parallel size): resume with the batch size and world size it was trained with")
        return samples // global_batch

    def _loader(self, split: str, sampler: ResumableSampler | None = None,
                generator: torch.Generator | None = None) -> DataLoader:
        return DataLoader(self._dataset(split), batch_size=self.batch_size, sampler=sampler, generator=generator,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          collate_fn=MultimodalCollator(self.tokenizer.pad_id, self.processors))
