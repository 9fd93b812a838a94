"""Accuracy evaluations against any OpenAI-compatible server: `kvflow eval gsm8k | mmlu`.

gsm8k.py / mmlu.py: dataset parsing, prompts, answer extraction and exact-match scoring;
common.py: packaged-data lookup, the concurrent chat client, the Wilson confidence interval;
cli.py: the subcommands. Importing this package pulls in nothing heavy.
"""
