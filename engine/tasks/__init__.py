"""Tasks: task data and prompts, grading, the LaTeX expression evaluator, the synthetic task."""
