"""The jobs: thin command lines over pipeline/ (summarize.py, finetune.py, demo.py), as scripts or console scripts."""
