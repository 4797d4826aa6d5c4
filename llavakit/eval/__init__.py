"""Evaluation: one file per benchmark (LLaVA-1.5's prompt and scoring), shared answer-file reading."""
