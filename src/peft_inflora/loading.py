"""Checking and resizing a saved continual state before it is loaded, and the undo of a failed load.

``InfLoRAConfig.from_pretrained`` checks the weights file of a local adapter folder (:func:`check_adapter_weights`)
before PEFT injects any layer; the state dict is then checked against the layers it is loaded into and the continual
state resized to the saved shapes (:func:`checked_load_plan`, :func:`resize_for_load`); a load that fails before any
weight is set takes the freshly injected adapter out of the model again (:func:`undo_failed_load`).
"""

from __future__ import annotations

import os
from typing import Union

from .errors import AdapterFileError


def check_adapter_weights(folder: Union[str, os.PathLike]) -> None:
    """Check the weights file of a local adapter folder without loading any tensor (nothing is unpickled).

    * ``adapter_model.safetensors`` present: its header must parse and cover the file (catches truncated and
      corrupted files; NaN / inf values and shapes are checked when the weights are loaded into the model);
    * only ``adapter_model.bin`` present: refused. It is a pickle file, and unpickling can run arbitrary code;
      peft-inflora only loads safetensors;
    * neither: nothing to check here (a config-only folder is fine for reading the config).

    Raises:
        AdapterFileError: naming the file and what to do.
    """
    from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME

    folder = str(folder)
    safetensors_file = os.path.join(folder, SAFETENSORS_WEIGHTS_NAME)
    pickle_file = os.path.join(folder, WEIGHTS_NAME)
    if os.path.isfile(safetensors_file):
        from safetensors import safe_open

        try:
            with safe_open(safetensors_file, framework="pt") as handle:
                list(handle.keys())
        except Exception as exc:  # SafetensorError, OSError, ...
            raise AdapterFileError(
                f"The adapter weights file {safetensors_file} cannot be read ({type(exc).__name__}: {exc}): it is "
                "truncated or corrupted, e.g. by an interrupted download or copy. Download or copy the adapter again "
                "(for the Hub: delete it from the Hugging Face cache first), or save it again with "
                "model.save_pretrained(folder)."
            ) from exc
    elif os.path.isfile(pickle_file):
        raise AdapterFileError(
            f"{folder} holds the adapter weights only as {WEIGHTS_NAME}, a pickle file, and no "
            f"{SAFETENSORS_WEIGHTS_NAME}: peft-inflora loads adapter weights only from safetensors, because "
            "unpickling a file can run arbitrary code. Save the adapter again with model.save_pretrained(folder) "
            "(safetensors is the default; do not pass safe_serialization=False), or, if you trust the file, "
            f"convert it once: safetensors.torch.save_file(torch.load('{pickle_file}', weights_only=True), "
            f"'{safetensors_file}')."
        )
