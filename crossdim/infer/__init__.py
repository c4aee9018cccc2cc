"""Inference internals: registry pull + cache (`pull`), inputs (`sources`), prediction
(`predictor`), outputs (`writers`), batch runs on Ray (`batch`). The public API is
`crossdim.inference`."""
