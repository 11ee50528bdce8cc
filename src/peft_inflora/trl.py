"""TRL integration (optional extra, ``pip install "peft-inflora[trl]"``): continual supervised fine-tuning.

``from peft_inflora.trl import ContinualSFTConfig, ContinualSFTTrainer``; the classes live in
:mod:`peft_inflora.continual.trl`. Importing this module without TRL raises an ImportError that names the extra;
``import peft_inflora`` never imports TRL.
"""

from .continual.trl import ContinualSFTConfig, ContinualSFTTrainer


__all__ = ["ContinualSFTConfig", "ContinualSFTTrainer"]
