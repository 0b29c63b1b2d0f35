"""The training spine, split by concern; trainer/trainer_utils.py re-exports every public name."""
