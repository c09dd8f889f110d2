"""The evaluation harness (issue 4): a fleet of logical agents, link model, round time, reports."""
