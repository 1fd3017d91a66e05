"""The vocabulary every part shares: phases and categories, byte units, step results, budgets, model calls."""
