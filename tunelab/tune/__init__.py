"""The tuning lab: task suites, the sandbox that runs model-written code, scoring and statistics."""
