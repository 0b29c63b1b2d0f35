"""Helpers below every other package of this repo: the user-error type and safe file reading.

    from util.errors import UserError
    from util.files import load_torch_file, read_sidecar, sidecar_path
    from util.modules import unwrap

Layering: scripts/ and eval_llm.py -> trainer/ -> dataset/, model/ -> util/. Nothing here imports a package of
ours, so model/ (e.g. model/model_lora.py) can use these without pulling in the training spine.
"""
