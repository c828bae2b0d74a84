"""Placeholders users write into prompt text (LMDeploy's names and values)."""

# Marks where an image goes in a prompt's text; each occurrence takes the next image of the prompt.
IMAGE_TOKEN = "<IMAGE_TOKEN>"
