"""`python -m parallex_kernel install ...` installs the kernelspec; anything else runs the
kernel (as Jupyter does, with -f CONNECTION_FILE)."""

import sys

if len(sys.argv) > 1 and sys.argv[1] == "install":
    from parallex_kernel.install import main

    sys.exit(main(sys.argv[2:]))
else:
    from ipykernel.kernelapp import IPKernelApp

    from parallex_kernel.kernel import ParallexKernel

    IPKernelApp.launch_instance(kernel_class=ParallexKernel)
