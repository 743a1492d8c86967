"""The job layer: a spec, its input, prompts, the engine's answers as typed rows, and the parts
and manifest that make a run resumable. ``runner.run_job`` is the pipeline; nothing here prints."""
