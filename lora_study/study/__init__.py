"""The study as configured: the validated config, its settings, the sweep's runs and their ids, LoRA methods,
module groups per architecture, and the checks a run must pass before it starts."""
