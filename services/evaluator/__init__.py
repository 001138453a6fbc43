"""The evaluator service: follows published policies and scores them.

    protocol.py   the evaluation protocol (Nature DQN, Dopamine), the GIF writer
    evaluator.py  the service: when to evaluate, history, TensorBoard, status

Imports core only.
"""
