"""Variational autoencoders: VAE / conditional VAE, hierarchical VAE, likelihood heads and collapse diagnostics."""

from deepgm.vae.diagnostics import active_units, diagnose, iwae_nll, mutual_information
from deepgm.vae.heads import HEADS, Head, make_head, soft_clamp
from deepgm.vae.hvae import HVAE
from deepgm.vae.vae import VAE, ConvDecoder, ConvEncoder, LatentVariableModel, MLPDecoder, MLPEncoder, PixelCNNDecoder

__all__ = ["HEADS", "HVAE", "VAE", "ConvDecoder", "ConvEncoder", "Head", "LatentVariableModel", "MLPDecoder",
           "MLPEncoder", "PixelCNNDecoder", "active_units", "diagnose", "iwae_nll", "make_head", "mutual_information",
           "soft_clamp"]
