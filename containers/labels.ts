import type { GarageContainerRole } from './types.ts'

/** Every container the daemon creates carries these; cleanup finds its own containers by them. */
export const garageLabelKeys = Object.freeze({
  managed: 'garage.managed',
  node: 'garage.node',
  role: 'garage.role',
})

export function garageLabels(nodePeerId: string, role: GarageContainerRole): Record<string, string> {
  return {
    [garageLabelKeys.managed]: 'true',
    [garageLabelKeys.node]: nodePeerId,
    [garageLabelKeys.role]: role,
  }
}

/** The label filter of one node's containers (optionally one role). */
export function nodeLabelFilter(nodePeerId: string, role?: GarageContainerRole): Record<string, string> {
  return {
    [garageLabelKeys.managed]: 'true',
    [garageLabelKeys.node]: nodePeerId,
    ...(role != null ? { [garageLabelKeys.role]: role } : {}),
  }
}
