"""Methods are LightningModules; each wraps a backbone (conf/method/)."""
