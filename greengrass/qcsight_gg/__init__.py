"""qcsight on AWS IoT Greengrass: build, validate, publish and deploy the components; a local nucleus runs them."""
