"""Training: heterogeneous pipelines that together train one model, exact to one process."""
