// The environment form: the network field says whether the chosen sandbox provider can enforce it.
const network = document.getElementById("id_network_policy");
const provider = document.getElementById("id_sandbox_provider");
const hint = document.getElementById("id_network_policy_helptext");

if (network && provider && hint) {
  const unenforced = JSON.parse(network.dataset.unenforced || "{}");
  const update = () => {
    const name = provider.value || network.dataset.defaultProvider;
    hint.textContent = unenforced[name]
      ? `Not enforced: the ${name} provider cannot restrict the network on this host (${unenforced[name]}); sandbox commands reach the network whatever is chosen.`
      : `Enforced by the ${name} provider.`;
    hint.classList.toggle("warn-text", Boolean(unenforced[name]));
  };
  provider.addEventListener("change", update);
  update();
}
