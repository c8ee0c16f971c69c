"""The demo world (shapes dataset + oracle, tiny teacher training): arrives with the data and distillation issues."""
