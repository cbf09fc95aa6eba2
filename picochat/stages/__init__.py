"""Training stages: pretrain, midtrain, SFT, RL (and what the chat stages share)."""
