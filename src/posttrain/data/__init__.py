"""Datasets (sft, pairs, unpaired, prompts+answers), collators and the embedded tasks."""
