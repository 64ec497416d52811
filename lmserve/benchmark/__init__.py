"""Load generators and measurement tools (`lmserve bench ...`)."""
