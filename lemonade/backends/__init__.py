"""Backend servers wrapped by the router, one per recipe family."""
