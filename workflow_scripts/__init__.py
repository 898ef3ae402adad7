"""Stages of the MLP-Mixer reproduction pipeline; each module is a CLI: python -m workflow_scripts.<stage>."""
