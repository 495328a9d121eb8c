"""The synthetic release: EGD-CXR + MIMIC-CXR files that no data-use agreement covers.

`synthetic.release.synthesize` writes a release in the real layout (`gazetune synth`), for the
tests, the demo and the benchmarks; `synthetic.phantom` draws its radiographs. Nothing in
`trainable` imports this package: a trial reads the release like the real one.
"""
