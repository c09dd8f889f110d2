"""Fed-FSTQ: Fisher-guided token selection and mixed-precision quantisation of LoRA updates."""
