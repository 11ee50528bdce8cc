"""The continual trainers: the task loop of :class:`~.loop.ContinualMixin` over ``Trainer`` and ``Seq2SeqTrainer``.

``ContinualTrainer`` takes :class:`~.arguments.ContinualTrainingArguments`, ``ContinualSeq2SeqTrainer`` takes
:class:`~.arguments.ContinualSeq2SeqTrainingArguments` (its generation evaluation uses ``generation_num_beams``).
"""

from __future__ import annotations

from transformers import Seq2SeqTrainer, Trainer

from .arguments import ContinualSeq2SeqTrainingArguments, ContinualTrainingArguments
from .loop import ContinualMixin


__all__ = ["ContinualSeq2SeqTrainer", "ContinualTrainer"]


class ContinualTrainer(ContinualMixin, Trainer):
    """A ``transformers.Trainer`` that learns a sequence of tasks with an InfLoRA adapter.

    ``train_continual(tasks)`` learns a list of :class:`~.arguments.ContinualTask`, ``train_task(task)`` one more
    task (continuing this trainer's sequence, a restart's ``output_dir`` or a downloaded adapter), and ``train()``
    its ``train_dataset`` as the next task; see :class:`~.loop.ContinualMixin`.
    """

    continual_arguments_class = ContinualTrainingArguments


class ContinualSeq2SeqTrainer(ContinualMixin, Seq2SeqTrainer):
    """The continual loop over ``transformers.Seq2SeqTrainer`` (encoder-decoder models, ``setting="generation"``)."""

    continual_arguments_class = ContinualSeq2SeqTrainingArguments
